//! The login phase (RFC 7143 section 6): security negotiation (None, CHAP) and operational
//! negotiation of the session's parameters. Pure logic: the transport reads Login Request
//! PDUs, hands their fields and text to [`Login::step`], and sends back what it returns.
//!
//! Spec sections: 6.1-6.2 (text negotiation), 6.3 (login stages), 11.12-11.13 (login PDUs and
//! status codes), 12.1 (CHAP), 13 (operational keys). Every answer to bad input is a status
//! in the reply, never a panic; after a refusal every further request is refused too.

use std::collections::HashSet;
use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::chap::{self, Challenge};
use crate::text;

/// The only iSCSI version there is (RFC 7143 section 11.12): the transport puts it in both
/// Version-max and Version-active of every Login Response.
pub const ISCSI_VERSION: u8 = 0;

/// The one portal group this target has, announced in the first response (RFC 7143 6.3).
pub const TARGET_PORTAL_GROUP_TAG: u16 = 1;

/// Bound on the text of one request accumulated over PDUs with the C bit.
pub const LOGIN_TEXT_MAX_BYTES: usize = 64 * 1024;

/// Bound on the pairs in one (accumulated) request. Real initiators send about 25; the bound
/// also keeps every reply below [`LOGIN_DATA_SEGMENT_MAX_BYTES`], since each answer to an
/// unknown key takes at most 63 + 15 bytes.
pub const LOGIN_PAIRS_MAX: usize = 64;

/// Bound on the Login Requests of one login; a normal login takes one to four, plus one per
/// continued PDU.
pub const LOGIN_REQUESTS_MAX: u32 = 64;

/// Data segment limit in both directions during login: the default MaxRecvDataSegmentLength
/// (RFC 7143 section 6.3: the default MaxRecvDataSegmentLength applies during login).
pub const LOGIN_DATA_SEGMENT_MAX_BYTES: usize = 8192;

/// Longest iSCSI name (RFC 7143 section 4.2.7).
const ISCSI_NAME_LENGTH_MAX_BYTES: usize = 223;

/// Range of MaxRecvDataSegmentLength, MaxBurstLength and FirstBurstLength (RFC 7143 13).
const DATA_LENGTH_MIN_BYTES: u32 = 512;
const DATA_LENGTH_MAX_BYTES: u32 = (1 << 24) - 1;

/// Our side of the boolean keys. InitialR2T=No (OR) lets the initiator choose unsolicited
/// data; ImmediateData=Yes (AND) likewise; DataPDUInOrder and DataSequenceInOrder=Yes (OR)
/// make in-order data the only outcome.
const OUR_INITIAL_R2T: bool = false;
const OUR_IMMEDIATE_DATA: bool = true;
const OUR_DATA_PDU_IN_ORDER: bool = true;
const OUR_DATA_SEQUENCE_IN_ORDER: bool = true;
/// Our side of DefaultTime2Wait (maximum) and DefaultTime2Retain (minimum): the defaults.
const OUR_DEFAULT_TIME2WAIT: u16 = 2;
const OUR_DEFAULT_TIME2RETAIN: u16 = 20;

/// Login stages (CSG/NSG).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Security = 0,
    Operational = 1,
    FullFeature = 3,
}

impl Stage {
    /// The stage a CSG/NSG field names; `None` for 2, which is reserved.
    pub fn from_wire(value: u8) -> Option<Stage> {
        match value {
            0 => Some(Stage::Security),
            1 => Some(Stage::Operational),
            3 => Some(Stage::FullFeature),
            _ => None,
        }
    }
}

/// Status-Class and Status-Detail of a Login Response (RFC 7143 section 11.13.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginStatus {
    pub class: u8,
    pub detail: u8,
}

impl LoginStatus {
    pub const SUCCESS: LoginStatus = LoginStatus::new(0x00, 0x00);
    pub const INITIATOR_ERROR: LoginStatus = LoginStatus::new(0x02, 0x00);
    pub const AUTHENTICATION_FAILURE: LoginStatus = LoginStatus::new(0x02, 0x01);
    pub const AUTHORIZATION_FAILURE: LoginStatus = LoginStatus::new(0x02, 0x02);
    pub const NOT_FOUND: LoginStatus = LoginStatus::new(0x02, 0x03);
    pub const UNSUPPORTED_VERSION: LoginStatus = LoginStatus::new(0x02, 0x05);
    pub const MISSING_PARAMETER: LoginStatus = LoginStatus::new(0x02, 0x07);
    pub const SESSION_TYPE_NOT_SUPPORTED: LoginStatus = LoginStatus::new(0x02, 0x09);
    pub const SESSION_DOES_NOT_EXIST: LoginStatus = LoginStatus::new(0x02, 0x0a);
    pub const INVALID_DURING_LOGIN: LoginStatus = LoginStatus::new(0x02, 0x0b);
    pub const TARGET_ERROR: LoginStatus = LoginStatus::new(0x03, 0x00);
    pub const OUT_OF_RESOURCES: LoginStatus = LoginStatus::new(0x03, 0x02);

    pub const fn new(class: u8, detail: u8) -> LoginStatus {
        LoginStatus { class, detail }
    }
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

impl Default for SessionParams {
    /// The values RFC 7143 section 13 gives keys that are not negotiated.
    fn default() -> SessionParams {
        SessionParams {
            header_digest: false,
            data_digest: false,
            initiator_max_recv_data_segment_length: 8192,
            target_max_recv_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
            max_connections: 1,
            default_time2wait: 2,
            default_time2retain: 20,
        }
    }
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

/// Why a login is refused: the status for the reply and a reason for the log.
#[derive(Debug)]
struct Refusal {
    status: LoginStatus,
    reason: String,
}

impl Refusal {
    fn new(status: LoginStatus, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
        }
    }

    fn initiator_error(reason: impl Into<String>) -> Refusal {
        Refusal::new(LoginStatus::INITIATOR_ERROR, reason)
    }

    fn authentication(reason: impl Into<String>) -> Refusal {
        Refusal::new(LoginStatus::AUTHENTICATION_FAILURE, reason)
    }
}

/// Where the security negotiation stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Auth {
    /// Nothing negotiated yet.
    Pending,
    /// We answered AuthMethod=CHAP and wait for CHAP_A.
    ChapChosen,
    /// We sent a challenge and wait for CHAP_N and CHAP_R.
    ChallengeSent(Challenge),
    /// The initiator proved itself, or no authentication is required.
    Done,
}

/// Which stage may carry a key, and who may send it (RFC 7143 sections 12 and 13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyKind {
    /// InitiatorName, TargetName, SessionType: only in the first request.
    FirstRequest,
    /// InitiatorAlias: any stage.
    InitiatorAlias,
    /// Declared by the target only; an initiator must not send them.
    TargetOnly,
    /// AuthMethod and the CHAP keys.
    Security,
    /// The operational keys of section 13.
    Operational,
    /// Keys of the full feature phase (SendTargets).
    FullFeatureOnly,
    /// Anything else, answered with NotUnderstood.
    Unknown,
}

fn key_kind(key: &str) -> KeyKind {
    match key {
        "InitiatorName" | "TargetName" | "SessionType" => KeyKind::FirstRequest,
        "InitiatorAlias" => KeyKind::InitiatorAlias,
        "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => KeyKind::TargetOnly,
        "AuthMethod" | "CHAP_A" | "CHAP_I" | "CHAP_C" | "CHAP_N" | "CHAP_R" => KeyKind::Security,
        "HeaderDigest"
        | "DataDigest"
        | "MaxConnections"
        | "InitialR2T"
        | "ImmediateData"
        | "MaxRecvDataSegmentLength"
        | "MaxBurstLength"
        | "FirstBurstLength"
        | "DefaultTime2Wait"
        | "DefaultTime2Retain"
        | "MaxOutstandingR2T"
        | "DataPDUInOrder"
        | "DataSequenceInOrder"
        | "ErrorRecoveryLevel"
        | "IFMarker"
        | "OFMarker"
        | "IFMarkInt"
        | "OFMarkInt" => KeyKind::Operational,
        "SendTargets" => KeyKind::FullFeatureOnly,
        _ => KeyKind::Unknown,
    }
}

/// The security keys of one request, gathered before acting because CHAP_N and CHAP_R (and
/// the initiator's CHAP_I and CHAP_C) only make sense together.
#[derive(Default)]
struct SecurityKeys<'a> {
    auth_method: Option<&'a str>,
    chap_a: Option<&'a str>,
    chap_i: Option<&'a str>,
    chap_c: Option<&'a str>,
    chap_n: Option<&'a str>,
    chap_r: Option<&'a str>,
}

/// How an operational key is answered; parameters are rendered once every key of the request
/// is in, since FirstBurstLength depends on MaxBurstLength.
enum Answer {
    Literal(&'static str),
    Param,
}

/// One connection's login, from the first Login Request to full feature phase or failure.
pub struct Login {
    config: Arc<LoginConfig>,
    tsih: u16,
    done: Option<Negotiated>,
    /// Set by a refusal; every later request is refused.
    failed: bool,
    requests: u32,
    /// The stage the initiator is in; `None` before the first request.
    stage: Option<Stage>,
    /// Version range and ISID of the first request, which later requests must repeat.
    first_header: Option<(u8, u8, [u8; 6])>,
    /// Text of PDUs with the C bit, waiting for the last part.
    pending_text: Vec<u8>,
    /// Every key received in this login, to detect redeclaration (RFC 7143 section 6.3).
    seen_keys: HashSet<String>,
    /// Whether the first complete request (with the names) has been handled.
    names_taken: bool,
    auth: Auth,
    session_type: SessionType,
    initiator_name: String,
    initiator_alias: Option<String>,
    target_name: Option<String>,
    params: SessionParams,
    /// Whether our MaxRecvDataSegmentLength has been declared yet.
    max_recv_declared: bool,
}

impl Login {
    /// `tsih` is the identifier the new session gets if the login succeeds (non-zero).
    pub fn new(config: Arc<LoginConfig>, tsih: u16) -> Login {
        Login {
            config,
            tsih,
            done: None,
            failed: false,
            requests: 0,
            stage: None,
            first_header: None,
            pending_text: Vec::new(),
            seen_keys: HashSet::new(),
            names_taken: false,
            auth: Auth::Pending,
            session_type: SessionType::Normal,
            initiator_name: String::new(),
            initiator_alias: None,
            target_name: None,
            params: SessionParams::default(),
            max_recv_declared: false,
        }
    }

    /// Handles one Login Request. After a reply with class != 0 the transport closes the
    /// connection.
    pub fn step(
        &mut self,
        request: &LoginRequest<'_>,
        targets: &dyn TargetDirectory,
    ) -> LoginReply {
        match self.try_step(request, targets) {
            Ok(reply) => reply,
            Err(refusal) => {
                self.failed = true;
                self.pending_text = Vec::new();
                warn!(
                    initiator = %self.initiator_name,
                    target = self.target_name.as_deref().unwrap_or(""),
                    class = refusal.status.class,
                    detail = refusal.status.detail,
                    reason = %refusal.reason,
                    "iSCSI login refused"
                );
                // T, CSG and NSG are reserved in a reject (RFC 7143 section 6.3.1).
                LoginReply {
                    transit: false,
                    cont: false,
                    csg: request.csg & 0x3,
                    nsg: 0,
                    status_class: refusal.status.class,
                    status_detail: refusal.status.detail,
                    tsih: request.tsih,
                    text: Vec::new(),
                }
            }
        }
    }

    /// Set once the last reply moved the connection to full feature phase.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.done.as_ref()
    }

    fn try_step(
        &mut self,
        request: &LoginRequest<'_>,
        targets: &dyn TargetDirectory,
    ) -> Result<LoginReply, Refusal> {
        if self.failed || self.done.is_some() {
            return Err(Refusal::new(
                LoginStatus::INVALID_DURING_LOGIN,
                "login request after the login ended",
            ));
        }
        self.requests += 1;
        if self.requests > LOGIN_REQUESTS_MAX {
            return Err(Refusal::initiator_error(format!(
                "more than {LOGIN_REQUESTS_MAX} login requests"
            )));
        }
        let stage = self.check_header(request)?;

        if self.pending_text.len() + request.text.len() > LOGIN_TEXT_MAX_BYTES {
            return Err(Refusal::initiator_error(format!(
                "login text longer than {LOGIN_TEXT_MAX_BYTES} bytes"
            )));
        }
        self.pending_text.extend_from_slice(request.text);
        if request.cont {
            // RFC 7143 section 6: each part of a continued text gets an empty reply.
            return Ok(self.reply(stage, None, Vec::new()));
        }
        let text = std::mem::take(&mut self.pending_text);
        let pairs = text::parse_pairs(&text, LOGIN_PAIRS_MAX)
            .map_err(|error| Refusal::initiator_error(format!("login text: {error}")))?;
        for (key, _) in &pairs {
            if !self.seen_keys.insert((*key).to_owned()) {
                return Err(Refusal::initiator_error(format!(
                    "key {key} sent twice in one login"
                )));
            }
        }

        let mut out = Vec::new();
        let first = !self.names_taken;
        if first {
            self.take_names(&pairs, targets)?;
            // RFC 7143 section 6.3: the first response after the first complete request
            // carries the portal group tag when a TargetName was given.
            if self.target_name.is_some() {
                text::encode_pair(
                    &mut out,
                    "TargetPortalGroupTag",
                    &TARGET_PORTAL_GROUP_TAG.to_string(),
                );
            }
        }

        let next = match stage {
            Stage::Security => self.negotiate_security(&pairs, request, first, &mut out)?,
            _ => self.negotiate_operational(&pairs, request, first, &mut out)?,
        };

        if out.len() > LOGIN_DATA_SEGMENT_MAX_BYTES {
            return Err(Refusal::new(
                LoginStatus::OUT_OF_RESOURCES,
                format!("login response of {} bytes", out.len()),
            ));
        }
        if let Some(next) = next {
            if next == Stage::FullFeature {
                self.finish();
            } else {
                self.stage = Some(next);
            }
        }
        let mut reply = self.reply(stage, next, out);
        if next == Some(Stage::FullFeature) {
            reply.tsih = self.tsih;
        }
        Ok(reply)
    }

    fn reply(&self, stage: Stage, next: Option<Stage>, text: Vec<u8>) -> LoginReply {
        LoginReply {
            transit: next.is_some(),
            cont: false,
            csg: stage as u8,
            nsg: next.map_or(0, |next| next as u8),
            status_class: 0,
            status_detail: 0,
            // RFC 7143 section 11.13: the new TSIH goes only in the final response.
            tsih: 0,
            text,
        }
    }

    /// Checks the header fields: version, TSIH, flags and stages. Returns the current stage.
    fn check_header(&mut self, request: &LoginRequest<'_>) -> Result<Stage, Refusal> {
        match self.first_header {
            None => {
                if !(request.version_min..=request.version_max).contains(&ISCSI_VERSION) {
                    return Err(Refusal::new(
                        LoginStatus::UNSUPPORTED_VERSION,
                        format!(
                            "versions {}..={} requested, only {ISCSI_VERSION} supported",
                            request.version_min, request.version_max
                        ),
                    ));
                }
                self.first_header = Some((request.version_max, request.version_min, request.isid));
            }
            Some(first) => {
                if first != (request.version_max, request.version_min, request.isid) {
                    return Err(Refusal::initiator_error(
                        "version or ISID changed during login",
                    ));
                }
            }
        }
        if request.tsih != 0 {
            // Adding a connection to a session: we allow one connection per session.
            return Err(Refusal::new(
                LoginStatus::SESSION_DOES_NOT_EXIST,
                format!("login to existing session {}", request.tsih),
            ));
        }
        if request.transit && request.cont {
            return Err(Refusal::initiator_error("T and C bits both set"));
        }
        let stage = match Stage::from_wire(request.csg) {
            Some(stage @ (Stage::Security | Stage::Operational)) => stage,
            _ => {
                return Err(Refusal::initiator_error(format!(
                    "invalid current stage {}",
                    request.csg
                )))
            }
        };
        match self.stage {
            None => self.stage = Some(stage),
            Some(current) if current == stage => {}
            Some(current) => {
                return Err(Refusal::initiator_error(format!(
                    "request in stage {stage:?} while in stage {current:?}"
                )))
            }
        }
        if request.transit {
            match Stage::from_wire(request.nsg) {
                Some(next) if next > stage => {}
                _ => {
                    return Err(Refusal::initiator_error(format!(
                        "invalid transition from stage {} to {}",
                        request.csg, request.nsg
                    )))
                }
            }
        }
        Ok(stage)
    }

    /// Takes InitiatorName, SessionType and TargetName from the first complete request
    /// (RFC 7143 section 6.3) and checks that the target exists.
    fn take_names(
        &mut self,
        pairs: &[(&str, &str)],
        targets: &dyn TargetDirectory,
    ) -> Result<(), Refusal> {
        let find = |wanted: &str| {
            pairs
                .iter()
                .find(|(key, _)| *key == wanted)
                .map(|(_, value)| *value)
        };
        let initiator_name = find("InitiatorName")
            .ok_or_else(|| Refusal::new(LoginStatus::MISSING_PARAMETER, "no InitiatorName"))?;
        self.initiator_name = check_name("InitiatorName", initiator_name)?.to_owned();
        self.session_type = match find("SessionType") {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(other) => {
                return Err(Refusal::new(
                    LoginStatus::SESSION_TYPE_NOT_SUPPORTED,
                    format!("SessionType={other}"),
                ))
            }
        };
        if let Some(target_name) = find("TargetName") {
            self.target_name = Some(check_name("TargetName", target_name)?.to_owned());
        }
        if self.session_type == SessionType::Normal {
            let Some(target_name) = self.target_name.as_deref() else {
                return Err(Refusal::new(
                    LoginStatus::MISSING_PARAMETER,
                    "no TargetName in a normal session",
                ));
            };
            if !targets.exists(target_name) {
                return Err(Refusal::new(
                    LoginStatus::NOT_FOUND,
                    format!("no target {target_name}"),
                ));
            }
        }
        self.names_taken = true;
        debug!(
            initiator = %self.initiator_name,
            target = self.target_name.as_deref().unwrap_or(""),
            session_type = ?self.session_type,
            "iSCSI login started"
        );
        Ok(())
    }

    /// Handles the keys every stage may carry; returns whether the key was one of them.
    fn any_stage_key(
        &mut self,
        kind: KeyKind,
        key: &str,
        value: &str,
        first: bool,
    ) -> Result<bool, Refusal> {
        match kind {
            KeyKind::FirstRequest if first => Ok(true),
            KeyKind::FirstRequest => Err(Refusal::initiator_error(format!(
                "{key} after the first login request"
            ))),
            KeyKind::InitiatorAlias => {
                let alias = text::check_value_length(key, value)
                    .map_err(|error| Refusal::initiator_error(error.to_string()))?;
                self.initiator_alias = Some(alias.to_owned());
                Ok(true)
            }
            KeyKind::TargetOnly => Err(Refusal::initiator_error(format!(
                "{key} may only be sent by a target"
            ))),
            KeyKind::FullFeatureOnly => Err(Refusal::initiator_error(format!(
                "{key} is not allowed in login"
            ))),
            KeyKind::Security | KeyKind::Operational | KeyKind::Unknown => Ok(false),
        }
    }

    /// The security stage (RFC 7143 sections 6.3.2 and 12.1.3). Returns the next stage when
    /// the reply transits.
    fn negotiate_security(
        &mut self,
        pairs: &[(&str, &str)],
        request: &LoginRequest<'_>,
        first: bool,
        out: &mut Vec<u8>,
    ) -> Result<Option<Stage>, Refusal> {
        let mut keys = SecurityKeys::default();
        for &(key, value) in pairs {
            let kind = key_kind(key);
            if self.any_stage_key(kind, key, value, first)? {
                continue;
            }
            match kind {
                KeyKind::Security => {
                    let slot = match key {
                        "AuthMethod" => &mut keys.auth_method,
                        "CHAP_A" => &mut keys.chap_a,
                        "CHAP_I" => &mut keys.chap_i,
                        "CHAP_C" => &mut keys.chap_c,
                        "CHAP_N" => &mut keys.chap_n,
                        // CHAP_R, the last key that key_kind calls Security.
                        _ => &mut keys.chap_r,
                    };
                    *slot = Some(value);
                }
                KeyKind::Operational => {
                    // RFC 7143 section 6.3: a key outside its stage is a protocol error.
                    return Err(Refusal::initiator_error(format!(
                        "{key} in the security stage"
                    )));
                }
                _ => text::encode_pair(out, key, text::NOT_UNDERSTOOD),
            }
        }

        // Whether this reply asks the initiator for more (then it cannot transit).
        let mut awaiting_initiator = false;
        if let Some(methods) = keys.auth_method {
            let wanted = if self.config.chap.is_some() {
                "CHAP"
            } else {
                "None"
            };
            // The target answers with the first method it accepts (RFC 7143 section 6.3.2);
            // with CHAP configured that can only be CHAP, without it only None.
            if !text::list_items(methods).any(|method| method == wanted) {
                return Err(Refusal::authentication(format!(
                    "AuthMethod={methods} without {wanted}"
                )));
            }
            text::encode_pair(out, "AuthMethod", wanted);
            if wanted == "CHAP" {
                self.auth = Auth::ChapChosen;
                awaiting_initiator = true;
            } else {
                self.auth = Auth::Done;
            }
        }
        if let Some(algorithms) = keys.chap_a {
            if self.auth != Auth::ChapChosen {
                return Err(Refusal::authentication("CHAP_A before AuthMethod=CHAP"));
            }
            if !text::list_items(algorithms).any(|algorithm| algorithm == chap::ALGORITHM_MD5) {
                return Err(Refusal::authentication(format!(
                    "CHAP_A={algorithms} without MD5"
                )));
            }
            let challenge = Challenge::random();
            text::encode_pair(out, "CHAP_A", chap::ALGORITHM_MD5);
            text::encode_pair(out, "CHAP_I", &challenge.identifier.to_string());
            text::encode_pair(out, "CHAP_C", &text::encode_hex(&challenge.challenge));
            self.auth = Auth::ChallengeSent(challenge);
            awaiting_initiator = true;
        }
        if keys.chap_n.is_some() || keys.chap_r.is_some() {
            self.check_chap_response(&keys, out)?;
        } else if keys.chap_i.is_some() || keys.chap_c.is_some() {
            return Err(Refusal::authentication(
                "CHAP_I or CHAP_C without CHAP_N and CHAP_R",
            ));
        }

        if !request.transit || awaiting_initiator {
            return Ok(None);
        }
        match (&self.auth, &self.config.chap) {
            (Auth::Done, _) => {}
            // RFC 7143 section 6.3.1: without required security, an initiator may transit
            // without offering any AuthMethod.
            (Auth::Pending, None) => self.auth = Auth::Done,
            (_, _) => {
                return Err(Refusal::authentication(
                    "transit requested before CHAP completed",
                ))
            }
        }
        // Straight to full feature phase would skip our MaxRecvDataSegmentLength declaration;
        // the target may choose a lower next stage (RFC 7143 section 6.3).
        Ok(Some(Stage::Operational))
    }

    /// Checks CHAP_N and CHAP_R against our challenge and, for mutual CHAP, answers the
    /// initiator's CHAP_I and CHAP_C (RFC 7143 section 12.1.3).
    fn check_chap_response(
        &mut self,
        keys: &SecurityKeys<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let Auth::ChallengeSent(challenge) = &self.auth else {
            return Err(Refusal::authentication("CHAP response before a challenge"));
        };
        let Some(config) = self.config.chap.as_ref() else {
            return Err(Refusal::authentication("CHAP without CHAP configured"));
        };
        let (Some(name), Some(response)) = (keys.chap_n, keys.chap_r) else {
            return Err(Refusal::authentication(
                "CHAP_N without CHAP_R or the reverse",
            ));
        };
        let response = text::decode_binary(response)
            .ok_or_else(|| Refusal::authentication("CHAP_R is not a binary value"))?;
        if name != config.user || !challenge.verify(&config.secret, &response) {
            return Err(Refusal::authentication(format!(
                "wrong CHAP credentials for user {name}"
            )));
        }
        if config.secret.len() < chap::SECRET_LENGTH_MIN_BYTES {
            warn!(
                "the CHAP secret is shorter than {} bytes, which RFC 7143 calls too weak",
                chap::SECRET_LENGTH_MIN_BYTES
            );
        }
        match (keys.chap_i, keys.chap_c) {
            (None, None) => {}
            (Some(identifier), Some(initiator_challenge)) => {
                let Some((mutual_user, mutual_secret)) = config.mutual.as_ref() else {
                    return Err(Refusal::authentication(
                        "mutual CHAP requested but not configured",
                    ));
                };
                let identifier = text::parse_number(identifier)
                    .and_then(|identifier| u8::try_from(identifier).ok())
                    .ok_or_else(|| Refusal::authentication("CHAP_I is not a number 0..=255"))?;
                let initiator_challenge = text::decode_binary(initiator_challenge)
                    .filter(|bytes| (1..=chap::CHALLENGE_LENGTH_MAX_BYTES).contains(&bytes.len()))
                    .ok_or_else(|| Refusal::authentication("CHAP_C is not a valid challenge"))?;
                // A challenge equal to ours would make us compute the initiator's answer for
                // it (a reflection attack).
                if initiator_challenge == challenge.challenge {
                    return Err(Refusal::authentication(
                        "initiator's CHAP_C repeats the target's challenge",
                    ));
                }
                if mutual_secret == &config.secret {
                    warn!("the mutual CHAP secret equals the initiator's; RFC 7143 forbids it");
                }
                let answer = chap::response_to(identifier, mutual_secret, &initiator_challenge);
                text::encode_pair(out, "CHAP_N", mutual_user);
                text::encode_pair(out, "CHAP_R", &text::encode_hex(&answer));
            }
            _ => {
                return Err(Refusal::authentication(
                    "CHAP_I without CHAP_C or the reverse",
                ))
            }
        }
        self.auth = Auth::Done;
        Ok(())
    }

    /// The operational stage (RFC 7143 sections 6.3.3 and 13). Returns the next stage when
    /// the reply transits.
    fn negotiate_operational(
        &mut self,
        pairs: &[(&str, &str)],
        request: &LoginRequest<'_>,
        first: bool,
        out: &mut Vec<u8>,
    ) -> Result<Option<Stage>, Refusal> {
        match (&self.auth, &self.config.chap) {
            (Auth::Done, _) => {}
            (Auth::Pending, None) => self.auth = Auth::Done,
            (_, _) => {
                return Err(Refusal::authentication(
                    "operational stage without CHAP authentication",
                ))
            }
        }
        let mut answers: Vec<(&str, Answer)> = Vec::new();
        for &(key, value) in pairs {
            let kind = key_kind(key);
            if self.any_stage_key(kind, key, value, first)? {
                continue;
            }
            match kind {
                KeyKind::Operational => {
                    let value = text::check_value_length(key, value)
                        .map_err(|error| Refusal::initiator_error(error.to_string()))?;
                    if let Some(answer) = self.negotiate_key(key, value)? {
                        answers.push((key, answer));
                    }
                }
                KeyKind::Security => {
                    return Err(Refusal::initiator_error(format!(
                        "{key} in the operational stage"
                    )));
                }
                _ => answers.push((key, Answer::Literal(text::NOT_UNDERSTOOD))),
            }
        }
        // RFC 7143 section 13.14: FirstBurstLength must not exceed MaxBurstLength.
        self.params.first_burst_length = self
            .params
            .first_burst_length
            .min(self.params.max_burst_length);
        for (key, answer) in answers {
            match answer {
                Answer::Literal(value) => text::encode_pair(out, key, value),
                Answer::Param => text::encode_pair(out, key, &self.param_value(key)),
            }
        }
        if !self.max_recv_declared {
            // Declared whether asked or not, so the initiator never assumes the 8192 default.
            let ours = clamp_data_length(self.config.max_recv_data_segment_length);
            self.params.target_max_recv_data_segment_length = ours;
            text::encode_pair(out, "MaxRecvDataSegmentLength", &ours.to_string());
            self.max_recv_declared = true;
        }
        if !request.transit {
            return Ok(None);
        }
        // The initiator proposed the transition; nothing we sent needs an answer.
        Ok(Some(Stage::FullFeature))
    }

    /// Negotiates one operational key into `self.params` and says how to answer it; `None`
    /// for a declaration, which gets no answer.
    fn negotiate_key(&mut self, key: &str, value: &str) -> Result<Option<Answer>, Refusal> {
        let config = &self.config;
        let params = &mut self.params;
        let answer = match key {
            "HeaderDigest" | "DataDigest" => {
                let chosen = text::list_items(value).find_map(|item| match item {
                    "CRC32C" => Some(("CRC32C", true)),
                    "None" => Some(("None", false)),
                    _ => None,
                });
                match chosen {
                    Some((name, enabled)) => {
                        if key == "HeaderDigest" {
                            params.header_digest = enabled;
                        } else {
                            params.data_digest = enabled;
                        }
                        Answer::Literal(name)
                    }
                    None => Answer::Literal(text::REJECT),
                }
            }
            "MaxRecvDataSegmentLength" => {
                let length = number_in(value, DATA_LENGTH_MIN_BYTES, DATA_LENGTH_MAX_BYTES)
                    .ok_or_else(|| {
                        Refusal::initiator_error(format!("MaxRecvDataSegmentLength={value}"))
                    })?;
                params.initiator_max_recv_data_segment_length = length;
                return Ok(None);
            }
            "MaxBurstLength" => number_answer(
                value,
                DATA_LENGTH_MIN_BYTES,
                DATA_LENGTH_MAX_BYTES,
                |offered| {
                    params.max_burst_length =
                        offered.min(clamp_data_length(config.max_burst_length));
                },
            ),
            "FirstBurstLength" => number_answer(
                value,
                DATA_LENGTH_MIN_BYTES,
                DATA_LENGTH_MAX_BYTES,
                |offered| {
                    params.first_burst_length =
                        offered.min(clamp_data_length(config.first_burst_length));
                },
            ),
            // One connection per session.
            "MaxConnections" => number_answer(value, 1, u32::from(u16::MAX), |_| {
                params.max_connections = 1;
            }),
            "MaxOutstandingR2T" => number_answer(value, 1, u32::from(u16::MAX), |offered| {
                let ours = u32::from(config.max_outstanding_r2t.max(1));
                params.max_outstanding_r2t = narrow(offered.min(ours));
            }),
            "DefaultTime2Wait" => number_answer(value, 0, 3600, |offered| {
                params.default_time2wait = narrow(offered.max(u32::from(OUR_DEFAULT_TIME2WAIT)));
            }),
            "DefaultTime2Retain" => number_answer(value, 0, 3600, |offered| {
                params.default_time2retain =
                    narrow(offered.min(u32::from(OUR_DEFAULT_TIME2RETAIN)));
            }),
            // Only level 0: session recovery by a new login.
            "ErrorRecoveryLevel" => number_answer(value, 0, 2, |_| {
                params.error_recovery_level = 0;
            }),
            "InitialR2T" | "ImmediateData" | "DataPDUInOrder" | "DataSequenceInOrder" => {
                let Some(offered) = text::parse_bool(value) else {
                    return Ok(Some(Answer::Literal(text::REJECT)));
                };
                match key {
                    "InitialR2T" => params.initial_r2t = offered || OUR_INITIAL_R2T,
                    "ImmediateData" => params.immediate_data = offered && OUR_IMMEDIATE_DATA,
                    "DataPDUInOrder" => params.data_pdu_in_order = offered || OUR_DATA_PDU_IN_ORDER,
                    _ => params.data_sequence_in_order = offered || OUR_DATA_SEQUENCE_IN_ORDER,
                }
                Answer::Param
            }
            // RFC 7143 section 13, Obsoleted Keys: markers are gone. IFMarker and OFMarker may be
            // answered No, which RFC 3720 initiators expect; IFMarkInt and OFMarkInt must be
            // answered Reject.
            "IFMarker" | "OFMarker" => match text::parse_bool(value) {
                Some(_) => Answer::Literal("No"),
                None => Answer::Literal(text::REJECT),
            },
            _ => Answer::Literal(text::REJECT),
        };
        Ok(Some(answer))
    }

    /// The negotiated value of a key, as answered.
    fn param_value(&self, key: &str) -> String {
        let params = &self.params;
        match key {
            "MaxBurstLength" => params.max_burst_length.to_string(),
            "FirstBurstLength" => params.first_burst_length.to_string(),
            "MaxConnections" => params.max_connections.to_string(),
            "MaxOutstandingR2T" => params.max_outstanding_r2t.to_string(),
            "DefaultTime2Wait" => params.default_time2wait.to_string(),
            "DefaultTime2Retain" => params.default_time2retain.to_string(),
            "ErrorRecoveryLevel" => params.error_recovery_level.to_string(),
            "InitialR2T" => text::bool_value(params.initial_r2t).to_owned(),
            "ImmediateData" => text::bool_value(params.immediate_data).to_owned(),
            "DataPDUInOrder" => text::bool_value(params.data_pdu_in_order).to_owned(),
            "DataSequenceInOrder" => text::bool_value(params.data_sequence_in_order).to_owned(),
            // Only the keys above are answered with Answer::Param.
            _ => text::REJECT.to_owned(),
        }
    }

    /// Records the outcome of the final, accepted request.
    fn finish(&mut self) {
        let target_name = match self.session_type {
            SessionType::Normal => self.target_name.clone(),
            SessionType::Discovery => None,
        };
        info!(
            initiator = %self.initiator_name,
            target = target_name.as_deref().unwrap_or("(discovery)"),
            tsih = self.tsih,
            "iSCSI login complete"
        );
        self.done = Some(Negotiated {
            session_type: self.session_type,
            initiator_name: self.initiator_name.clone(),
            initiator_alias: self.initiator_alias.clone(),
            target_name,
            params: self.params.clone(),
        });
    }
}

/// An iSCSI name: non-empty and at most 223 bytes.
fn check_name<'a>(key: &str, name: &'a str) -> Result<&'a str, Refusal> {
    if name.is_empty() || name.len() > ISCSI_NAME_LENGTH_MAX_BYTES {
        return Err(Refusal::initiator_error(format!(
            "{key} of {} bytes",
            name.len()
        )));
    }
    Ok(name)
}

/// A number within `low..=high`, or `None`.
fn number_in(value: &str, low: u32, high: u32) -> Option<u32> {
    let number = text::parse_number(value)?;
    let number = u32::try_from(number).ok()?;
    (low..=high).contains(&number).then_some(number)
}

/// The answer to a numeric key: the negotiated value (which `set` records) when `value` is a
/// number in `lo..=hi`, else Reject (the default stays).
fn number_answer(value: &str, lo: u32, hi: u32, set: impl FnOnce(u32)) -> Answer {
    match number_in(value, lo, hi) {
        Some(offered) => {
            set(offered);
            Answer::Param
        }
        None => Answer::Literal(text::REJECT),
    }
}

/// Narrows a value already bounded by a u16 range.
fn narrow(value: u32) -> u16 {
    u16::try_from(value).unwrap_or(u16::MAX)
}

/// Keeps a configured length inside the range the keys allow.
fn clamp_data_length(length: u32) -> u32 {
    length.clamp(DATA_LENGTH_MIN_BYTES, DATA_LENGTH_MAX_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use md5::{Digest, Md5};

    const TARGET: &str = "iqn.2024-01.org.grove:pool.vol.main";
    const INITIATOR: &str = "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-inq";
    const TSIH: u16 = 7;

    struct Targets;

    impl TargetDirectory for Targets {
        fn exists(&self, target_name: &str) -> bool {
            target_name == TARGET
        }
    }

    fn config(chap: Option<ChapConfig>) -> Arc<LoginConfig> {
        Arc::new(LoginConfig {
            chap,
            max_recv_data_segment_length: 65_536,
            max_burst_length: 1_048_576,
            first_burst_length: 262_144,
            max_outstanding_r2t: 4,
        })
    }

    fn chap_config(mutual: bool) -> ChapConfig {
        ChapConfig {
            user: "alice".into(),
            secret: "alice-secret-16b".into(),
            mutual: mutual.then(|| ("grove".into(), "target-secret-16".into())),
        }
    }

    /// One Login Request with default header fields.
    struct Request<'a> {
        csg: u8,
        nsg: u8,
        transit: bool,
        cont: bool,
        pairs: &'a [(&'a str, &'a str)],
    }

    fn send_raw(login: &mut Login, request: &Request<'_>, text: &[u8]) -> LoginReply {
        login.step(
            &LoginRequest {
                transit: request.transit,
                cont: request.cont,
                csg: request.csg,
                nsg: request.nsg,
                version_max: 0,
                version_min: 0,
                isid: [0x80, 0, 0, 0, 0, 1],
                tsih: 0,
                text,
            },
            &Targets,
        )
    }

    fn send(
        login: &mut Login,
        csg: u8,
        nsg: u8,
        transit: bool,
        pairs: &[(&str, &str)],
    ) -> LoginReply {
        let request = Request {
            csg,
            nsg,
            transit,
            cont: false,
            pairs,
        };
        send_raw(login, &request, &text::encode_pairs(request.pairs))
    }

    fn reply_pairs(reply: &LoginReply) -> Vec<(String, String)> {
        text::parse_pairs(&reply.text, 128)
            .expect("replies are well formed")
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect()
    }

    fn value(reply: &LoginReply, key: &str) -> Option<String> {
        reply_pairs(reply)
            .into_iter()
            .find(|(found, _)| found == key)
            .map(|(_, value)| value)
    }

    fn status(reply: &LoginReply) -> LoginStatus {
        LoginStatus::new(reply.status_class, reply.status_detail)
    }

    fn names() -> Vec<(&'static str, &'static str)> {
        vec![
            ("InitiatorName", INITIATOR),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
        ]
    }

    /// MD5(identifier || secret || challenge), computed here apart from the chap module.
    fn chap_answer(identifier: &str, secret: &str, challenge_hex: &str) -> String {
        let identifier: u8 = identifier.parse().expect("CHAP_I is decimal");
        let challenge = hex::decode(challenge_hex.trim_start_matches("0x")).expect("hex");
        let mut hasher = Md5::new();
        hasher.update([identifier]);
        hasher.update(secret.as_bytes());
        hasher.update(&challenge);
        format!("0x{}", hex::encode(hasher.finalize()))
    }

    #[test]
    fn rfc7143_6_3_login_without_auth_in_one_request() {
        let mut login = Login::new(config(None), TSIH);
        let mut pairs = names();
        pairs.extend([
            ("HeaderDigest", "None,CRC32C"),
            ("DataDigest", "None"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("MaxOutstandingR2T", "1"),
            ("ErrorRecoveryLevel", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("MaxConnections", "1"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
        ]);
        let reply = send(&mut login, 1, 3, true, &pairs);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert!(reply.transit);
        assert_eq!((reply.csg, reply.nsg, reply.tsih), (1, 3, TSIH));
        let answers = reply_pairs(&reply);
        let expected: Vec<(String, String)> = [
            ("TargetPortalGroupTag", "1"),
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("InitialR2T", "Yes"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("MaxOutstandingR2T", "1"),
            ("ErrorRecoveryLevel", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
            ("MaxConnections", "1"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("MaxRecvDataSegmentLength", "65536"),
        ]
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect();
        assert_eq!(answers, expected);
        let negotiated = login.negotiated().expect("login complete");
        assert_eq!(negotiated.session_type, SessionType::Normal);
        assert_eq!(negotiated.initiator_name, INITIATOR);
        assert_eq!(negotiated.target_name.as_deref(), Some(TARGET));
        let params = &negotiated.params;
        assert_eq!(params.initiator_max_recv_data_segment_length, 262_144);
        assert_eq!(params.target_max_recv_data_segment_length, 65_536);
        assert_eq!(params.default_time2retain, 0);
        assert!(!params.header_digest && !params.data_digest);
        // Nothing more is accepted once the login is over.
        let again = send(&mut login, 1, 3, true, &[]);
        assert_eq!(status(&again), LoginStatus::INVALID_DURING_LOGIN);
    }

    #[test]
    fn rfc7143_13_defaults_when_nothing_is_negotiated() {
        let mut login = Login::new(config(None), TSIH);
        let reply = send(&mut login, 1, 3, true, &names());
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        // Our declaration goes out even unasked.
        assert_eq!(
            value(&reply, "MaxRecvDataSegmentLength").as_deref(),
            Some("65536")
        );
        let params = &login.negotiated().expect("login complete").params;
        let defaults = SessionParams {
            target_max_recv_data_segment_length: 65_536,
            ..SessionParams::default()
        };
        assert_eq!(params, &defaults);
        assert_eq!(defaults.max_burst_length, 262_144);
        assert_eq!(defaults.first_burst_length, 65_536);
    }

    #[test]
    fn rfc7143_6_3_1_security_stage_without_auth() {
        let mut login = Login::new(config(None), TSIH);
        let mut pairs = names();
        pairs.push(("AuthMethod", "CHAP,None"));
        let reply = send(&mut login, 0, 1, true, &pairs);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert!(reply.transit);
        assert_eq!((reply.csg, reply.nsg, reply.tsih), (0, 1, 0));
        assert_eq!(value(&reply, "AuthMethod").as_deref(), Some("None"));
        assert_eq!(value(&reply, "TargetPortalGroupTag").as_deref(), Some("1"));
        assert!(login.negotiated().is_none());
        let reply = send(&mut login, 1, 3, true, &[("HeaderDigest", "None")]);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert_eq!((reply.nsg, reply.tsih), (3, TSIH));
        assert_eq!(value(&reply, "TargetPortalGroupTag"), None);
        assert!(login.negotiated().is_some());
    }

    #[test]
    fn rfc7143_6_3_1_security_stage_without_any_key_and_straight_to_full_feature() {
        // No AuthMethod at all, and NSG=3: we choose the operational stage to declare our
        // MaxRecvDataSegmentLength there.
        let mut login = Login::new(config(None), TSIH);
        let reply = send(&mut login, 0, 3, true, &names());
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert_eq!((reply.transit, reply.nsg), (true, 1));
        let reply = send(&mut login, 1, 3, true, &[]);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert_eq!(
            value(&reply, "MaxRecvDataSegmentLength").as_deref(),
            Some("65536")
        );
        assert!(login.negotiated().is_some());
    }

    #[test]
    fn rfc7143_6_3_2_auth_only_chap_without_chap_configured() {
        let mut login = Login::new(config(None), TSIH);
        let mut pairs = names();
        pairs.push(("AuthMethod", "CHAP"));
        let reply = send(&mut login, 0, 1, true, &pairs);
        assert_eq!(status(&reply), LoginStatus::AUTHENTICATION_FAILURE);
    }

    /// Runs the CHAP exchange as libiscsi does, up to the initiator's response.
    fn chap_until_challenge(login: &mut Login) -> (String, String) {
        let mut pairs = names();
        pairs.push(("AuthMethod", "CHAP,None"));
        let reply = send(login, 0, 1, true, &pairs);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        // Authentication is not done, so no transit yet.
        assert!(!reply.transit);
        assert_eq!(value(&reply, "AuthMethod").as_deref(), Some("CHAP"));
        let reply = send(login, 0, 1, false, &[("CHAP_A", "7,5")]);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert!(!reply.transit);
        assert_eq!(value(&reply, "CHAP_A").as_deref(), Some("5"));
        let identifier = value(&reply, "CHAP_I").expect("CHAP_I sent");
        let challenge = value(&reply, "CHAP_C").expect("CHAP_C sent");
        assert!(challenge.starts_with("0x"));
        assert!(challenge.len() >= 2 + 2 * 16);
        (identifier, challenge)
    }

    #[test]
    fn rfc7143_12_1_3_one_way_chap() {
        let mut login = Login::new(config(Some(chap_config(false))), TSIH);
        let (identifier, challenge) = chap_until_challenge(&mut login);
        let response = chap_answer(&identifier, "alice-secret-16b", &challenge);
        let reply = send(
            &mut login,
            0,
            1,
            true,
            &[("CHAP_N", "alice"), ("CHAP_R", &response)],
        );
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert_eq!((reply.transit, reply.csg, reply.nsg), (true, 0, 1));
        assert!(reply.text.is_empty());
        let reply = send(&mut login, 1, 3, true, &[("MaxBurstLength", "16384")]);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert_eq!(reply.tsih, TSIH);
        let params = &login.negotiated().expect("login complete").params;
        assert_eq!(params.max_burst_length, 16_384);
        // FirstBurstLength (default 65536) may not exceed MaxBurstLength.
        assert_eq!(params.first_burst_length, 16_384);
    }

    #[test]
    fn rfc7143_12_1_3_chap_response_in_base64() {
        let mut login = Login::new(config(Some(chap_config(false))), TSIH);
        let (identifier, challenge) = chap_until_challenge(&mut login);
        let response = chap_answer(&identifier, "alice-secret-16b", &challenge);
        let bytes = hex::decode(&response[2..]).expect("hex");
        let base64 = format!("0b{}", encode_base64(&bytes));
        let reply = send(
            &mut login,
            0,
            1,
            true,
            &[("CHAP_N", "alice"), ("CHAP_R", &base64)],
        );
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert!(reply.transit);
    }

    /// A plain base64 encoder for the test, independent of the decoder under test.
    fn encode_base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let word = chunk.iter().enumerate().fold(0u32, |word, (index, &byte)| {
                word | u32::from(byte) << (16 - 8 * index)
            });
            for index in 0..4 {
                if index <= chunk.len() {
                    out.push(char::from(
                        ALPHABET[(word >> (18 - 6 * index) & 63) as usize],
                    ));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn rfc7143_12_1_3_mutual_chap() {
        let mut login = Login::new(config(Some(chap_config(true))), TSIH);
        let (identifier, challenge) = chap_until_challenge(&mut login);
        let response = chap_answer(&identifier, "alice-secret-16b", &challenge);
        let our_challenge = "0x00112233445566778899aabbccddeeff";
        let reply = send(
            &mut login,
            0,
            1,
            true,
            &[
                ("CHAP_N", "alice"),
                ("CHAP_R", &response),
                ("CHAP_I", "42"),
                ("CHAP_C", our_challenge),
            ],
        );
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert_eq!((reply.transit, reply.nsg), (true, 1));
        assert_eq!(value(&reply, "CHAP_N").as_deref(), Some("grove"));
        assert_eq!(
            value(&reply, "CHAP_R"),
            Some(chap_answer("42", "target-secret-16", our_challenge))
        );
        let reply = send(&mut login, 1, 3, true, &[]);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert!(login.negotiated().is_some());
    }

    #[test]
    fn rfc7143_12_1_3_mutual_chap_refusals() {
        // Not configured.
        let mut login = Login::new(config(Some(chap_config(false))), TSIH);
        let (identifier, challenge) = chap_until_challenge(&mut login);
        let response = chap_answer(&identifier, "alice-secret-16b", &challenge);
        let reply = send(
            &mut login,
            0,
            1,
            true,
            &[
                ("CHAP_N", "alice"),
                ("CHAP_R", &response),
                ("CHAP_I", "1"),
                ("CHAP_C", "0x0102030405060708"),
            ],
        );
        assert_eq!(status(&reply), LoginStatus::AUTHENTICATION_FAILURE);

        // The initiator reflects our own challenge.
        let mut login = Login::new(config(Some(chap_config(true))), TSIH);
        let (identifier, challenge) = chap_until_challenge(&mut login);
        let response = chap_answer(&identifier, "alice-secret-16b", &challenge);
        let reply = send(
            &mut login,
            0,
            1,
            true,
            &[
                ("CHAP_N", "alice"),
                ("CHAP_R", &response),
                ("CHAP_I", &identifier),
                ("CHAP_C", &challenge),
            ],
        );
        assert_eq!(status(&reply), LoginStatus::AUTHENTICATION_FAILURE);
        assert!(reply.text.is_empty());
    }

    #[test]
    fn rfc7143_12_1_3_wrong_secret_or_user() {
        let mut login = Login::new(config(Some(chap_config(false))), TSIH);
        let (identifier, challenge) = chap_until_challenge(&mut login);
        let response = chap_answer(&identifier, "not-the-secret!!", &challenge);
        let reply = send(
            &mut login,
            0,
            1,
            true,
            &[("CHAP_N", "alice"), ("CHAP_R", &response)],
        );
        assert_eq!(status(&reply), LoginStatus::AUTHENTICATION_FAILURE);
        // A request after a refusal is refused too.
        let reply = send(&mut login, 1, 3, true, &[]);
        assert_eq!(status(&reply), LoginStatus::INVALID_DURING_LOGIN);

        let mut login = Login::new(config(Some(chap_config(false))), TSIH);
        let (identifier, challenge) = chap_until_challenge(&mut login);
        let response = chap_answer(&identifier, "alice-secret-16b", &challenge);
        let reply = send(
            &mut login,
            0,
            1,
            true,
            &[("CHAP_N", "mallory"), ("CHAP_R", &response)],
        );
        assert_eq!(status(&reply), LoginStatus::AUTHENTICATION_FAILURE);
    }

    #[test]
    fn rfc7143_6_3_1_chap_required_but_skipped_or_refused() {
        // Straight to the operational stage.
        let mut login = Login::new(config(Some(chap_config(false))), TSIH);
        let reply = send(&mut login, 1, 3, true, &names());
        assert_eq!(status(&reply), LoginStatus::AUTHENTICATION_FAILURE);
        // Only None offered.
        let mut login = Login::new(config(Some(chap_config(false))), TSIH);
        let mut pairs = names();
        pairs.push(("AuthMethod", "None"));
        let reply = send(&mut login, 0, 1, true, &pairs);
        assert_eq!(status(&reply), LoginStatus::AUTHENTICATION_FAILURE);
        // Transit without answering the challenge.
        let mut login = Login::new(config(Some(chap_config(false))), TSIH);
        chap_until_challenge(&mut login);
        let reply = send(&mut login, 0, 1, true, &[]);
        assert_eq!(status(&reply), LoginStatus::AUTHENTICATION_FAILURE);
        // No MD5 among the algorithms.
        let mut login = Login::new(config(Some(chap_config(false))), TSIH);
        let mut pairs = names();
        pairs.push(("AuthMethod", "CHAP"));
        send(&mut login, 0, 1, false, &pairs);
        let reply = send(&mut login, 0, 1, false, &[("CHAP_A", "7,6")]);
        assert_eq!(status(&reply), LoginStatus::AUTHENTICATION_FAILURE);
    }

    #[test]
    fn rfc7143_6_3_missing_names() {
        let mut login = Login::new(config(None), TSIH);
        let reply = send(&mut login, 1, 3, true, &[("TargetName", TARGET)]);
        assert_eq!(status(&reply), LoginStatus::MISSING_PARAMETER);
        let mut login = Login::new(config(None), TSIH);
        let reply = send(&mut login, 1, 3, true, &[("InitiatorName", INITIATOR)]);
        assert_eq!(status(&reply), LoginStatus::MISSING_PARAMETER);
    }

    #[test]
    fn rfc7143_11_13_5_unknown_target() {
        let mut login = Login::new(config(None), TSIH);
        let reply = send(
            &mut login,
            1,
            3,
            true,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", "iqn.2024-01.org.other:x"),
            ],
        );
        assert_eq!(status(&reply), LoginStatus::NOT_FOUND);
    }

    #[test]
    fn rfc7143_13_21_discovery_session() {
        let mut login = Login::new(config(None), TSIH);
        let reply = send(
            &mut login,
            1,
            3,
            true,
            &[("InitiatorName", INITIATOR), ("SessionType", "Discovery")],
        );
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert_eq!(value(&reply, "TargetPortalGroupTag"), None);
        let negotiated = login.negotiated().expect("login complete");
        assert_eq!(negotiated.session_type, SessionType::Discovery);
        assert_eq!(negotiated.target_name, None);

        let mut login = Login::new(config(None), TSIH);
        let reply = send(
            &mut login,
            1,
            3,
            true,
            &[("InitiatorName", INITIATOR), ("SessionType", "Other")],
        );
        assert_eq!(status(&reply), LoginStatus::SESSION_TYPE_NOT_SUPPORTED);
    }

    #[test]
    fn rfc7143_6_continued_text() {
        let mut login = Login::new(config(None), TSIH);
        let mut pairs = names();
        pairs.push(("HeaderDigest", "CRC32C"));
        let text = text::encode_pairs(&pairs);
        // Split inside a pair: the parts only make sense together.
        let (head, tail) = text.split_at(text.len() / 2);
        let part = Request {
            csg: 1,
            nsg: 3,
            transit: false,
            cont: true,
            pairs: &[],
        };
        let reply = send_raw(&mut login, &part, head);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert!(!reply.transit && !reply.cont);
        assert!(reply.text.is_empty());
        let last = Request {
            transit: true,
            cont: false,
            ..part
        };
        let reply = send_raw(&mut login, &last, tail);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert!(reply.transit);
        assert_eq!(value(&reply, "HeaderDigest").as_deref(), Some("CRC32C"));
        assert!(
            login
                .negotiated()
                .expect("login complete")
                .params
                .header_digest
        );
    }

    #[test]
    fn rfc7143_6_continued_text_is_bounded() {
        let mut login = Login::new(config(None), TSIH);
        let part = Request {
            csg: 1,
            nsg: 3,
            transit: false,
            cont: true,
            pairs: &[],
        };
        let chunk = vec![b'a'; 8192];
        let mut last = LoginReply {
            transit: false,
            cont: false,
            csg: 0,
            nsg: 0,
            status_class: 0,
            status_detail: 0,
            tsih: 0,
            text: Vec::new(),
        };
        for _ in 0..9 {
            last = send_raw(&mut login, &part, &chunk);
            if last.status_class != 0 {
                break;
            }
        }
        assert_eq!(status(&last), LoginStatus::INITIATOR_ERROR);
        // T and C together are refused.
        let mut login = Login::new(config(None), TSIH);
        let both = Request {
            transit: true,
            ..part
        };
        let reply = send_raw(&mut login, &both, b"");
        assert_eq!(status(&reply), LoginStatus::INITIATOR_ERROR);
    }

    #[test]
    fn rfc7143_13_1_digest_negotiation() {
        for (offer, answer, enabled) in [
            ("CRC32C,None", "CRC32C", true),
            ("None,CRC32C", "None", false),
            ("CRC32C", "CRC32C", true),
            ("MD5,CRC32C", "CRC32C", true),
            ("MD5", "Reject", false),
        ] {
            let mut login = Login::new(config(None), TSIH);
            let mut pairs = names();
            pairs.push(("HeaderDigest", offer));
            pairs.push(("DataDigest", offer));
            let reply = send(&mut login, 1, 3, true, &pairs);
            assert_eq!(status(&reply), LoginStatus::SUCCESS, "{offer}");
            assert_eq!(
                value(&reply, "HeaderDigest").as_deref(),
                Some(answer),
                "{offer}"
            );
            assert_eq!(
                value(&reply, "DataDigest").as_deref(),
                Some(answer),
                "{offer}"
            );
            let params = &login.negotiated().expect("login complete").params;
            assert_eq!(
                (params.header_digest, params.data_digest),
                (enabled, enabled)
            );
        }
    }

    #[test]
    fn rfc7143_13_numeric_and_boolean_results() {
        let mut login = Login::new(config(None), TSIH);
        let mut pairs = names();
        pairs.extend([
            ("MaxBurstLength", "16777215"),
            ("FirstBurstLength", "0x100000"),
            ("MaxOutstandingR2T", "64"),
            ("DefaultTime2Wait", "0"),
            ("DefaultTime2Retain", "3600"),
            ("ErrorRecoveryLevel", "2"),
            ("MaxConnections", "8"),
            ("InitialR2T", "No"),
            ("ImmediateData", "No"),
            ("DataPDUInOrder", "No"),
            ("DataSequenceInOrder", "No"),
        ]);
        let reply = send(&mut login, 1, 3, true, &pairs);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        for (key, expected) in [
            ("MaxBurstLength", "1048576"),
            ("FirstBurstLength", "262144"),
            ("MaxOutstandingR2T", "4"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "20"),
            ("ErrorRecoveryLevel", "0"),
            ("MaxConnections", "1"),
            ("InitialR2T", "No"),
            ("ImmediateData", "No"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
        ] {
            assert_eq!(value(&reply, key).as_deref(), Some(expected), "{key}");
        }
        let params = &login.negotiated().expect("login complete").params;
        assert_eq!(params.max_burst_length, 1_048_576);
        assert_eq!(params.first_burst_length, 262_144);
        assert_eq!(params.max_outstanding_r2t, 4);
        assert!(!params.initial_r2t && !params.immediate_data);
        assert!(params.data_pdu_in_order && params.data_sequence_in_order);
    }

    #[test]
    fn rfc7143_6_2_out_of_range_values_are_rejected() {
        let mut login = Login::new(config(None), TSIH);
        let mut pairs = names();
        pairs.extend([
            ("MaxBurstLength", "100"),
            ("ErrorRecoveryLevel", "3"),
            ("ImmediateData", "Maybe"),
            ("OFMarkInt", "2048~8192"),
            ("IFMarkInt", "2048"),
        ]);
        let reply = send(&mut login, 1, 3, true, &pairs);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        for key in [
            "MaxBurstLength",
            "ErrorRecoveryLevel",
            "ImmediateData",
            "OFMarkInt",
            "IFMarkInt",
        ] {
            assert_eq!(value(&reply, key).as_deref(), Some("Reject"), "{key}");
        }
        // Rejected offers leave the defaults.
        let params = &login.negotiated().expect("login complete").params;
        assert_eq!(params.max_burst_length, 262_144);
        assert!(params.immediate_data);

        // A bad declaration has no answer to carry a Reject: the login fails.
        let mut login = Login::new(config(None), TSIH);
        let mut pairs = names();
        pairs.push(("MaxRecvDataSegmentLength", "100"));
        let reply = send(&mut login, 1, 3, true, &pairs);
        assert_eq!(status(&reply), LoginStatus::INITIATOR_ERROR);
    }

    #[test]
    fn rfc7143_6_2_unknown_key_is_not_understood() {
        let mut login = Login::new(config(None), TSIH);
        let mut pairs = names();
        pairs.push(("X-com.example.Feature", "1"));
        pairs.push(("iSCSIProtocolLevel", "2"));
        let reply = send(&mut login, 1, 3, true, &pairs);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert_eq!(
            value(&reply, "X-com.example.Feature").as_deref(),
            Some("NotUnderstood")
        );
        assert_eq!(
            value(&reply, "iSCSIProtocolLevel").as_deref(),
            Some("NotUnderstood")
        );
    }

    #[test]
    fn rfc7143_6_3_duplicate_key() {
        let mut login = Login::new(config(None), TSIH);
        let mut pairs = names();
        pairs.push(("MaxBurstLength", "8192"));
        pairs.push(("MaxBurstLength", "8192"));
        let reply = send(&mut login, 1, 3, true, &pairs);
        assert_eq!(status(&reply), LoginStatus::INITIATOR_ERROR);

        // Across requests of one login too.
        let mut login = Login::new(config(None), TSIH);
        let mut pairs = names();
        pairs.push(("MaxBurstLength", "8192"));
        let reply = send(&mut login, 1, 3, false, &pairs);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert!(!reply.transit);
        let reply = send(&mut login, 1, 3, true, &[("MaxBurstLength", "8192")]);
        assert_eq!(status(&reply), LoginStatus::INITIATOR_ERROR);
    }

    #[test]
    fn rfc7143_11_12_version_mismatch() {
        let mut login = Login::new(config(None), TSIH);
        let text = text::encode_pairs(&names());
        let reply = login.step(
            &LoginRequest {
                transit: true,
                cont: false,
                csg: 1,
                nsg: 3,
                version_max: 2,
                version_min: 1,
                isid: [0; 6],
                tsih: 0,
                text: &text,
            },
            &Targets,
        );
        assert_eq!(status(&reply), LoginStatus::UNSUPPORTED_VERSION);
    }

    #[test]
    fn rfc7143_6_3_1_nonzero_tsih() {
        let mut login = Login::new(config(None), TSIH);
        let text = text::encode_pairs(&names());
        let reply = login.step(
            &LoginRequest {
                transit: true,
                cont: false,
                csg: 1,
                nsg: 3,
                version_max: 0,
                version_min: 0,
                isid: [0; 6],
                tsih: 5,
                text: &text,
            },
            &Targets,
        );
        assert_eq!(status(&reply), LoginStatus::SESSION_DOES_NOT_EXIST);
        assert_eq!(reply.tsih, 5);
        assert!(login.negotiated().is_none());
    }

    #[test]
    fn rfc7143_6_3_invalid_stages_and_keys() {
        for (csg, nsg) in [(2, 3), (3, 3), (1, 1), (1, 0), (0, 2), (0, 0)] {
            let mut login = Login::new(config(None), TSIH);
            let reply = send(&mut login, csg, nsg, true, &names());
            assert_eq!(status(&reply), LoginStatus::INITIATOR_ERROR, "{csg}->{nsg}");
        }
        // Back to the security stage after leaving it.
        let mut login = Login::new(config(None), TSIH);
        send(&mut login, 0, 1, true, &names());
        let reply = send(&mut login, 0, 1, true, &[]);
        assert_eq!(status(&reply), LoginStatus::INITIATOR_ERROR);
        // An operational key in the security stage, a security key in the operational stage,
        // keys only a target sends, a full feature key.
        for (csg, key, value) in [
            (0, "MaxBurstLength", "8192"),
            (1, "AuthMethod", "None"),
            (1, "TargetAddress", "10.0.0.1:3260,1"),
            (1, "TargetPortalGroupTag", "1"),
            (1, "SendTargets", "All"),
        ] {
            let mut login = Login::new(config(None), TSIH);
            let mut pairs = names();
            pairs.push((key, value));
            let reply = send(&mut login, csg, csg + 1, true, &pairs);
            assert_eq!(status(&reply), LoginStatus::INITIATOR_ERROR, "{key}");
        }
        // Names only in the first request.
        let mut login = Login::new(config(None), TSIH);
        send(
            &mut login,
            0,
            1,
            true,
            &[("InitiatorName", INITIATOR), ("SessionType", "Discovery")],
        );
        let reply = send(&mut login, 1, 3, true, &[("TargetName", TARGET)]);
        assert_eq!(status(&reply), LoginStatus::INITIATOR_ERROR);
    }

    #[test]
    fn rfc7143_6_1_malformed_text() {
        let mut login = Login::new(config(None), TSIH);
        let request = Request {
            csg: 1,
            nsg: 3,
            transit: true,
            cont: false,
            pairs: &[],
        };
        let reply = send_raw(&mut login, &request, b"InitiatorName=iqn.x");
        assert_eq!(status(&reply), LoginStatus::INITIATOR_ERROR);
    }

    #[test]
    fn rfc7143_13_operational_stage_over_several_requests() {
        let mut login = Login::new(config(None), TSIH);
        let mut pairs = names();
        pairs.push(("InitiatorAlias", "host one"));
        pairs.push(("MaxBurstLength", "65536"));
        let reply = send(&mut login, 1, 3, false, &pairs);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        assert!(!reply.transit);
        assert_eq!(value(&reply, "TargetPortalGroupTag").as_deref(), Some("1"));
        assert_eq!(
            value(&reply, "MaxRecvDataSegmentLength").as_deref(),
            Some("65536")
        );
        let reply = send(&mut login, 1, 3, true, &[("ImmediateData", "No")]);
        assert_eq!(status(&reply), LoginStatus::SUCCESS);
        // Declared once only.
        assert_eq!(value(&reply, "MaxRecvDataSegmentLength"), None);
        assert_eq!(value(&reply, "TargetPortalGroupTag"), None);
        let negotiated = login.negotiated().expect("login complete");
        assert_eq!(negotiated.initiator_alias.as_deref(), Some("host one"));
        assert_eq!(negotiated.params.max_burst_length, 65_536);
        assert_eq!(negotiated.params.first_burst_length, 65_536);
        assert!(!negotiated.params.immediate_data);
    }
}
