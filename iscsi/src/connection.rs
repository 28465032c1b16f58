//! One iSCSI connection: login, then the full feature phase (RFC 7143).
//!
//! Three tasks per connection:
//! - the *reader* reads PDUs and hands them to the dispatcher in order;
//! - the *dispatcher* (the connection's own task) keeps the command window, gathers write
//!   data (immediate, unsolicited, then solicited with R2Ts), starts each SCSI command in a
//!   task of its own once its data is complete, answers NOP, Text, task management and
//!   Logout requests;
//! - the *writer* sends every PDU, stamping StatSN, ExpCmdSN and MaxCmdSN as it sends, so
//!   status numbers go out in the order the initiator receives them.
//!
//! One connection per session (MaxConnections=1) and ErrorRecoveryLevel 0: any protocol
//! error ends the connection (after a Reject where the RFC asks for one); the initiator
//! recovers by logging in again, which reinstates the session.
//!
//! Memory is bounded per connection: commands in the window (`queue_depth`), data segments
//! (our MaxRecvDataSegmentLength), the unsolicited data of each command (FirstBurstLength),
//! and write data solicited at once (at most [`SOLICITING_MAX`] commands, each at most
//! [`MAX_TRANSFER_BYTES`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use grove_engine::SessionClient;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::login::{Login, LoginRequest, Negotiated, SessionParams, SessionType, Stage};
use crate::names;
use crate::pdu::{self, op, read_pdu, reject, Digests, Pdu, FLAG_FINAL, RESERVED_TAG};
use crate::portal::{Portal, SessionKey};
use crate::scsi::{self, Lun, Nexus, Residual, Response, SenseKey, Status, MAX_TRANSFER_BYTES};

/// REPORT LUNS answers the same from any LUN (SPC-4 6.33).
const REPORT_LUNS: u8 = 0xa0;
/// Immediate SCSI commands of one session in progress at once; more are rejected (RFC 7143
/// 11.17.1, "immediate command reject"), so the I bit cannot get around the command window.
const IMMEDIATE_MAX: u32 = 16;
/// Commands whose write data is being solicited with R2Ts at once; others wait their turn.
const SOLICITING_MAX: usize = 8;
/// Data segment accepted during login (the RFC 7143 default MaxRecvDataSegmentLength).
const LOGIN_DATA_MAX: u32 = 8192;
/// Buffer sizes of the socket reader and writer.
const IO_BUFFER_BYTES: usize = 256 * 1024;
/// PDUs read ahead of the dispatcher.
const READ_AHEAD_PDUS: usize = 16;

/// Why a connection ends before its initiator logs out.
#[derive(Debug, thiserror::Error)]
enum Fatal {
    #[error(transparent)]
    Pdu(#[from] pdu::PduError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the writer stopped")]
    WriterGone,
}

/// Serves one accepted connection to its end.
pub(crate) async fn serve<S>(portal: Arc<Portal>, stream: S, peer: String, local: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(IO_BUFFER_BYTES, reader);
    let mut writer = BufWriter::with_capacity(IO_BUFFER_BYTES, writer);
    let login = tokio::select! {
        // Nothing is in flight before full feature phase: the connection simply closes.
        _ = crate::portal::stop_requested(&portal.options.stop) => return,
        login = tokio::time::timeout(
            portal.options.login_timeout,
            login(&portal, &mut reader, &mut writer),
        ) => login,
    };
    let logged_in = match login {
        Ok(Ok(Some(logged_in))) => logged_in,
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            debug!(%peer, %error, "login ended");
            return;
        }
        Err(_) => {
            info!(%peer, "login not completed in time; closing");
            return;
        }
    };
    let LoggedIn {
        negotiated,
        isid,
        cmd_sn,
        stat_sn,
    } = logged_in;

    let nexus_id = portal.next_nexus();
    let mut key = None;
    let lun = match negotiated.session_type {
        SessionType::Discovery => None,
        SessionType::Normal => {
            let target_name = negotiated.target_name.clone().unwrap_or_default();
            let export = names::export_name(&target_name).unwrap_or_default();
            let client = SessionClient {
                protocol: "iscsi".to_string(),
                address: peer.clone(),
            };
            // The login checked that the target exists, but it may have gone since.
            let session = match portal.pool.open_session(&export, client) {
                Ok(session) => session,
                Err(error) => {
                    warn!(%peer, %target_name, %error, "cannot open the target after login");
                    return;
                }
            };
            let shared = portal.unit(&session.target().canonical_name());
            let nexus = Nexus {
                id: nexus_id,
                initiator_name: negotiated.initiator_name.clone(),
                isid,
                target_name: target_name.clone(),
            };
            key = Some(SessionKey {
                initiator: negotiated.initiator_name.to_ascii_lowercase(),
                isid,
                target: target_name.to_ascii_lowercase(),
            });
            Some(Arc::new(Lun::new(session, shared, nexus)))
        }
    };
    let stop = match &key {
        Some(key) => portal.register(key.clone(), nexus_id),
        None => watch::channel(false).1,
    };
    info!(
        %peer,
        initiator = %negotiated.initiator_name,
        target = negotiated.target_name.as_deref().unwrap_or("(discovery)"),
        header_digest = negotiated.params.header_digest,
        data_digest = negotiated.params.data_digest,
        "iSCSI session started"
    );

    let params = negotiated.params.clone();
    let digests = Digests {
        header: params.header_digest,
        data: params.data_digest,
    };
    let window = Arc::new(Mutex::new(Window {
        exp_cmd_sn: cmd_sn,
        in_flight: 0,
        immediate: 0,
        depth: portal.options.queue_depth.max(1),
    }));
    let (out, outgoing) = mpsc::unbounded_channel();
    let writer_task = tokio::spawn(write_loop(
        writer,
        outgoing,
        window.clone(),
        stat_sn,
        digests,
    ));
    let (pdus, incoming) = mpsc::channel(READ_AHEAD_PDUS);
    let max_data = params.target_max_recv_data_segment_length;
    let reader_task = tokio::spawn(async move {
        loop {
            let next = read_pdu(&mut reader, digests, max_data).await;
            let end = !matches!(next, Ok(Some(_)));
            if pdus.send(next).await.is_err() || end {
                return;
            }
        }
    });

    let (completions, completed) = mpsc::unbounded_channel();
    let mut connection = Connection {
        portal: portal.clone(),
        lun: lun.clone(),
        params,
        local,
        window,
        out,
        tasks: HashMap::new(),
        solicit_queue: VecDeque::new(),
        soliciting: 0,
        next_ttt: 1,
        completions,
        pending_tmfs: Vec::new(),
        text_pending: None,
        ping: None,
    };
    let result = connection.run(incoming, completed, stop).await;
    match &result {
        Ok(()) => info!(%peer, "iSCSI session ended by logout"),
        Err(error) => info!(%peer, %error, "iSCSI connection closed"),
    }
    reader_task.abort();
    // Running commands finish on their own (engine I/O is never cut short); the writer ends
    // once they and the dispatcher have dropped their senders.
    drop(connection);
    let _ = writer_task.await;
    if let Some(lun) = &lun {
        lun.nexus_lost();
    }
    if let Some(key) = &key {
        portal.unregister(key, nexus_id);
    }
}

struct LoggedIn {
    negotiated: Negotiated,
    isid: [u8; 6],
    /// The initiator's next CmdSN.
    cmd_sn: u32,
    /// Our next StatSN.
    stat_sn: u32,
}

/// Runs the login phase; `None` when it failed (the reply said why) or the peer left.
async fn login<R, W>(
    portal: &Arc<Portal>,
    reader: &mut R,
    writer: &mut W,
) -> Result<Option<LoggedIn>, Fatal>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut login = Login::new(portal.login.clone(), portal.next_tsih());
    let mut stat_sn: Option<u32> = None;
    loop {
        let Some(request) = read_pdu(reader, Digests::default(), LOGIN_DATA_MAX).await? else {
            return Ok(None);
        };
        if request.opcode() != op::LOGIN {
            return Err(Fatal::Protocol(format!(
                "opcode {:#04x} during login",
                request.opcode()
            )));
        }
        let cmd_sn = request.u32_at(24);
        // The first response's StatSN is ours to choose: the initiator's ExpStatSN.
        let current_stat_sn = *stat_sn.get_or_insert(request.u32_at(28));
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&request.bhs[8..14]);
        let flags = request.flags();
        let fields = LoginRequest {
            transit: flags & 0x80 != 0,
            cont: flags & 0x40 != 0,
            csg: (flags >> 2) & 0x3,
            nsg: flags & 0x3,
            version_max: request.byte(2),
            version_min: request.byte(3),
            isid,
            tsih: request.u16_at(14),
            text: &request.data,
        };
        let reply = login.step(&fields, portal.as_ref());
        let mut response = Pdu::new(op::LOGIN_RESPONSE);
        response.set_flags(
            (u8::from(reply.transit) << 7)
                | (u8::from(reply.cont) << 6)
                | ((reply.csg & 0x3) << 2)
                | (reply.nsg & 0x3),
        );
        response.set_byte(2, 0);
        response.set_byte(3, 0);
        response.bhs[8..14].copy_from_slice(&isid);
        response.set_u16(14, reply.tsih);
        response.set_itt(request.itt());
        response.set_u32(24, current_stat_sn);
        response.set_u32(28, cmd_sn);
        response.set_u32(
            32,
            cmd_sn.wrapping_add(portal.options.queue_depth.max(1) - 1),
        );
        response.set_byte(36, reply.status_class);
        response.set_byte(37, reply.status_detail);
        response.data = Bytes::from(reply.text);
        response
            .write_to(writer, Digests::default())
            .await
            .map_err(pdu::PduError::Io)?;
        writer.flush().await.map_err(pdu::PduError::Io)?;
        stat_sn = Some(current_stat_sn.wrapping_add(1));
        if reply.status_class != 0 {
            debug!(
                class = reply.status_class,
                detail = reply.status_detail,
                "login refused"
            );
            return Ok(None);
        }
        if reply.transit && reply.nsg == Stage::FullFeature as u8 {
            if let Some(negotiated) = login.negotiated() {
                return Ok(Some(LoggedIn {
                    negotiated: negotiated.clone(),
                    isid,
                    cmd_sn,
                    stat_sn: current_stat_sn.wrapping_add(1),
                }));
            }
        }
    }
}

/// The command window (RFC 7143 4.2.2.1). `in_flight` counts non-immediate SCSI commands
/// accepted and not yet answered, so the window closes while the queue is full:
/// MaxCmdSN = ExpCmdSN - 1 + (depth - in_flight). Both terms move together when a command
/// arrives and MaxCmdSN grows when one completes: it never goes back.
struct Window {
    exp_cmd_sn: u32,
    in_flight: u32,
    /// Immediate SCSI commands accepted and not yet answered (outside the window, bounded
    /// by [`IMMEDIATE_MAX`]).
    immediate: u32,
    depth: u32,
}

impl Window {
    fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
            .wrapping_sub(1)
            .wrapping_add(self.depth.saturating_sub(self.in_flight))
    }
}

/// How the writer fills the StatSN field of an outgoing PDU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stamp {
    /// No StatSN (Data-In without status).
    None,
    /// The next StatSN, without advancing it (R2T, unsolicited NOP-In).
    Current,
    /// The next StatSN, then advance (every PDU carrying a status).
    Advance,
}

struct Outgoing {
    pdu: Pdu,
    stamp: Stamp,
    /// Close the connection once this PDU is sent (logout, fatal reject).
    last: bool,
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    window: Arc<Mutex<Window>>,
    mut stat_sn: u32,
    digests: Digests,
) {
    while let Some(mut next) = outgoing.recv().await {
        match next.stamp {
            Stamp::None => {}
            Stamp::Current => next.pdu.set_u32(24, stat_sn),
            Stamp::Advance => {
                next.pdu.set_u32(24, stat_sn);
                stat_sn = stat_sn.wrapping_add(1);
            }
        }
        {
            let window = window.lock();
            next.pdu.set_u32(28, window.exp_cmd_sn);
            next.pdu.set_u32(32, window.max_cmd_sn());
        }
        if let Err(error) = next.pdu.write_to(&mut writer, digests).await {
            debug!(%error, "cannot send to the initiator");
            return;
        }
        // Coalesce what is queued; flush when nothing more is ready.
        if (next.last || outgoing.is_empty()) && writer.flush().await.is_err() {
            return;
        }
        if next.last {
            let _ = writer.shutdown().await;
            return;
        }
    }
    let _ = writer.flush().await;
}

/// Who has the last word on a running command: its own response, or an abort. Decided once,
/// atomically, so an initiator never sees both a command's status and a successful ABORT TASK
/// for it.
struct Outcome(AtomicU8);

impl Outcome {
    const RUNNING: u8 = 0;
    const ANSWERED: u8 = 1;
    const ABORTED: u8 = 2;

    fn new() -> Arc<Outcome> {
        Arc::new(Outcome(AtomicU8::new(Outcome::RUNNING)))
    }

    /// The command's response may go out; false if it was aborted first.
    fn answer(&self) -> bool {
        self.settle(Outcome::ANSWERED)
    }

    /// The command is aborted: its response will not go out; false if it already went.
    fn abort(&self) -> bool {
        self.settle(Outcome::ABORTED)
    }

    fn settle(&self, to: u8) -> bool {
        self.0
            .compare_exchange(Outcome::RUNNING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// A SCSI command the dispatcher knows about.
enum Task {
    /// Waiting for its write data.
    Gathering(Box<Gathering>),
    /// Executing in its own task.
    Running { outcome: Arc<Outcome> },
}

struct Gathering {
    lun_field: [u8; 8],
    cdb: Vec<u8>,
    expected_in: u32,
    expected_out: u32,
    /// Counted in the window's `in_flight` (else in `immediate`).
    windowed: bool,
    /// Write data received so far, in order.
    data: Vec<u8>,
    /// Whether unsolicited Data-Out PDUs may still come.
    unsolicited_open: bool,
    /// Where unsolicited data must end (FirstBurstLength or the whole transfer).
    unsolicited_end: u32,
    next_unsolicited_data_sn: u32,
    /// The R2T outstanding, if any.
    r2t: Option<R2t>,
    /// Number of R2Ts sent (R2TSN of the next).
    r2t_count: u32,
    solicit: Solicit,
}

/// Where a command is in getting its solicited data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Solicit {
    /// Not (yet) asking: unsolicited data may still come, or none is needed.
    No,
    /// Waiting for one of the [`SOLICITING_MAX`] slots.
    Queued,
    /// Holding a slot: R2Ts go out one burst at a time.
    Active,
}

struct R2t {
    ttt: u32,
    offset: u32,
    len: u32,
    received: u32,
    next_data_sn: u32,
}

/// A task management request waiting for the tasks it aborts to finish.
struct PendingTmf {
    itt: u32,
    waiting: HashSet<u32>,
    response: u8,
    /// LUN RESET: reset the unit once its tasks are gone.
    reset: bool,
}

struct Connection {
    portal: Arc<Portal>,
    lun: Option<Arc<Lun>>,
    params: SessionParams,
    local: SocketAddr,
    window: Arc<Mutex<Window>>,
    out: mpsc::UnboundedSender<Outgoing>,
    tasks: HashMap<u32, Task>,
    solicit_queue: VecDeque<u32>,
    soliciting: usize,
    next_ttt: u32,
    completions: mpsc::UnboundedSender<u32>,
    pending_tmfs: Vec<PendingTmf>,
    /// The rest of a Text response too long for one PDU: its TTT and remaining bytes.
    text_pending: Option<(u32, Vec<u8>)>,
    /// A NOP-In ping sent on an idle connection: its TTT.
    ping: Option<u32>,
}

impl Connection {
    async fn run(
        &mut self,
        mut incoming: mpsc::Receiver<Result<Option<Pdu>, pdu::PduError>>,
        mut completed: mpsc::UnboundedReceiver<u32>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), Fatal> {
        let nop_interval = self.portal.options.nop_interval;
        loop {
            tokio::select! {
                next = incoming.recv() => {
                    let pdu = match next {
                        Some(Ok(Some(pdu))) => pdu,
                        Some(Ok(None)) | None => return Err(Fatal::Protocol("connection closed by the initiator".into())),
                        Some(Err(pdu::PduError::DataDigest { bhs })) => {
                            // RFC 7143 7.8: discard the PDU and reject it; at ERL 0 the
                            // session cannot recover the lost data, so it ends.
                            self.reject(&bhs, reject::DATA_DIGEST_ERROR, true);
                            return Err(Fatal::Protocol("data digest error".into()));
                        }
                        Some(Err(error)) => return Err(error.into()),
                    };
                    self.ping = None;
                    if self.dispatch(pdu)? {
                        return Ok(());
                    }
                }
                Some(itt) = completed.recv() => self.completed(itt),
                _ = crate::portal::stop_requested(&self.portal.options.stop) => {
                    self.drain(&mut completed).await;
                    return Err(Fatal::Protocol("the target is stopping".into()));
                }
                changed = stop.changed() => {
                    if changed.is_ok() && *stop.borrow() {
                        return Err(Fatal::Protocol("session reinstated by a new login".into()));
                    }
                }
                _ = tokio::time::sleep(nop_interval) => {
                    if self.ping.is_some() {
                        return Err(Fatal::Protocol("the initiator did not answer a NOP-In ping".into()));
                    }
                    self.send_ping()?;
                }
            }
        }
    }

    /// Stops taking commands: those still waiting for data are dropped (never acknowledged),
    /// running ones finish and are answered, then the unit is flushed.
    async fn drain(&mut self, completed: &mut mpsc::UnboundedReceiver<u32>) {
        let _ = self.abort_gathering();
        while self
            .tasks
            .values()
            .any(|task| matches!(task, Task::Running { .. }))
        {
            match completed.recv().await {
                Some(itt) => self.completed(itt),
                None => break,
            }
        }
        if let Some(lun) = &self.lun {
            if let Err(error) = lun.session().flush().await {
                warn!(%error, "flush at stop failed");
            }
        }
        info!("target stopping: commands answered and flushed; closing");
    }

    /// Drops every command still gathering data.
    fn abort_gathering(&mut self) -> HashSet<u32> {
        let gathering: HashSet<u32> = self
            .tasks
            .iter()
            .filter(|(_, task)| matches!(task, Task::Gathering(_)))
            .map(|(&itt, _)| itt)
            .collect();
        self.abort_tasks(|itt| gathering.contains(&itt))
    }

    fn send(&self, pdu: Pdu, stamp: Stamp) -> Result<(), Fatal> {
        self.out
            .send(Outgoing {
                pdu,
                stamp,
                last: false,
            })
            .map_err(|_| Fatal::WriterGone)
    }

    fn send_last(&self, pdu: Pdu, stamp: Stamp) {
        let _ = self.out.send(Outgoing {
            pdu,
            stamp,
            last: true,
        });
    }

    /// Sends a Reject carrying the offending header. `last` closes the connection after it.
    fn reject(&self, bhs: &[u8; pdu::BHS_LEN], reason: u8, last: bool) {
        let mut pdu = Pdu::new(op::REJECT);
        pdu.set_flags(FLAG_FINAL);
        pdu.set_byte(2, reason);
        pdu.set_itt(RESERVED_TAG);
        pdu.data = Bytes::copy_from_slice(bhs);
        if last {
            self.send_last(pdu, Stamp::Advance);
        } else {
            let _ = self.send(pdu, Stamp::Advance);
        }
    }

    fn protocol_error(&self, request: &Pdu, why: String) -> Fatal {
        self.reject(&request.bhs, reject::PROTOCOL_ERROR, true);
        Fatal::Protocol(why)
    }

    fn send_ping(&mut self) -> Result<(), Fatal> {
        let ttt = self.new_ttt();
        let mut pdu = Pdu::new(op::NOP_IN);
        pdu.set_flags(FLAG_FINAL);
        pdu.set_itt(RESERVED_TAG);
        pdu.set_u32(20, ttt);
        self.ping = Some(ttt);
        self.send(pdu, Stamp::Current)
    }

    fn new_ttt(&mut self) -> u32 {
        let ttt = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        ttt
    }

    /// Checks a non-immediate request against the command window and advances it. False
    /// means the request is outside the window and must be ignored (RFC 7143 4.2.2.1).
    fn accept_cmd_sn(&self, request: &Pdu, counts_in_flight: bool) -> bool {
        let mut window = self.window.lock();
        if request.immediate() {
            return true;
        }
        let cmd_sn = request.u32_at(24);
        if cmd_sn != window.exp_cmd_sn {
            debug!(
                cmd_sn,
                exp_cmd_sn = window.exp_cmd_sn,
                max_cmd_sn = window.max_cmd_sn(),
                "command outside the window ignored"
            );
            return false;
        }
        // The window is closed once in_flight reaches depth: a command there is beyond
        // MaxCmdSN.
        if counts_in_flight && window.in_flight >= window.depth {
            return false;
        }
        window.exp_cmd_sn = window.exp_cmd_sn.wrapping_add(1);
        if counts_in_flight {
            window.in_flight += 1;
        }
        true
    }

    /// Handles one PDU from the initiator. True when the session ends by logout.
    fn dispatch(&mut self, request: Pdu) -> Result<bool, Fatal> {
        match request.opcode() {
            op::SCSI_COMMAND => self.scsi_command(request)?,
            op::DATA_OUT => self.data_out(request)?,
            op::NOP_OUT => self.nop_out(request)?,
            op::TEXT => self.text(request)?,
            op::TASK_MANAGEMENT => self.task_management(request)?,
            op::LOGOUT => {
                if !self.accept_cmd_sn(&request, false) {
                    return Ok(false);
                }
                self.logout(request);
                return Ok(true);
            }
            op::SNACK => {
                // Error recovery level 0: no SNACK support.
                self.reject(&request.bhs, reject::COMMAND_NOT_SUPPORTED, false);
            }
            op::LOGIN => {
                return Err(self.protocol_error(&request, "login in full feature phase".into()))
            }
            other => {
                self.reject(&request.bhs, reject::COMMAND_NOT_SUPPORTED, false);
                debug!(opcode = other, "unknown opcode rejected");
            }
        }
        Ok(false)
    }

    fn scsi_command(&mut self, request: Pdu) -> Result<(), Fatal> {
        if self.lun.is_none() {
            // Discovery sessions carry no SCSI commands.
            return Err(self.protocol_error(&request, "SCSI command in a discovery session".into()));
        }
        if request.immediate() {
            let mut window = self.window.lock();
            if window.immediate >= IMMEDIATE_MAX {
                drop(window);
                self.reject(&request.bhs, reject::IMMEDIATE_COMMAND_REJECT, false);
                return Ok(());
            }
            window.immediate += 1;
        } else if !self.accept_cmd_sn(&request, true) {
            return Ok(());
        }
        let windowed = !request.immediate();
        let itt = request.itt();
        let flags = request.flags();
        let (reads, writes) = (flags & 0x40 != 0, flags & 0x20 != 0);
        let expected_length = request.u32_at(20);
        let mut cdb = request.bhs[32..48].to_vec();
        // An extended CDB AHS (type 1) carries the bytes past the first 16.
        if let Some(extra) = extended_cdb(&request.ahs) {
            cdb.extend_from_slice(extra);
        }
        if self.tasks.contains_key(&itt) {
            // A tag in use: the initiator lost track; at ERL 0 the session cannot continue.
            self.release_window(windowed);
            return Err(self.protocol_error(&request, format!("task tag {itt:#x} already in use")));
        }
        let expected_out = if writes { expected_length } else { 0 };
        let expected_in = if reads { expected_length } else { 0 };
        let immediate = request.data.len() as u32;
        if immediate > expected_out || (immediate > 0 && !self.params.immediate_data) {
            self.release_window(windowed);
            return Err(
                self.protocol_error(&request, "immediate data beyond the expected length".into())
            );
        }
        let lun_field = request.lun();
        let mut gathering = Gathering {
            lun_field,
            cdb,
            expected_in,
            expected_out,
            windowed,
            data: Vec::new(),
            unsolicited_open: writes && !request.final_bit() && !self.params.initial_r2t,
            unsolicited_end: if self.params.initial_r2t {
                immediate
            } else {
                expected_out.min(self.params.first_burst_length)
            },
            next_unsolicited_data_sn: 0,
            r2t: None,
            r2t_count: 0,
            solicit: Solicit::No,
        };
        let refused = if expected_out > MAX_TRANSFER_BYTES || expected_in > MAX_TRANSFER_BYTES {
            // Refused before any data is gathered; unsolicited data for it is dropped.
            Some(scsi::check_condition(SenseKey::IllegalRequest, 0x24, 0x00))
        } else if !pdu::is_lun_zero(lun_field) && gathering.cdb[0] != REPORT_LUNS {
            Some(no_such_lun(&gathering.cdb, expected_in))
        } else {
            None
        };
        if let Some(response) = refused {
            let finished = Finished {
                itt,
                lun_field,
                windowed,
                r2t_count: 0,
            };
            self.answer_now(finished, response);
            return Ok(());
        }
        gathering.data.reserve_exact(expected_out as usize);
        gathering.data.extend_from_slice(&request.data);
        self.tasks.insert(itt, Task::Gathering(Box::new(gathering)));
        self.advance_gathering(itt)
    }

    fn release_window(&self, windowed: bool) {
        release(&self.window, windowed);
    }

    /// After data arrived for `itt`: starts the command when all of it is there, otherwise
    /// asks for more once unsolicited data is over.
    fn advance_gathering(&mut self, itt: u32) -> Result<(), Fatal> {
        let Some(Task::Gathering(gathering)) = self.tasks.get_mut(&itt) else {
            return Ok(());
        };
        if gathering.data.len() as u32 == gathering.expected_out {
            let solicit = gathering.solicit;
            if let Some(Task::Gathering(gathering)) = self.tasks.remove(&itt) {
                self.leave_solicit(itt, solicit);
                self.start(itt, *gathering);
            }
            return self.solicit_next();
        }
        if gathering.unsolicited_open || gathering.solicit != Solicit::No {
            return Ok(());
        }
        gathering.solicit = Solicit::Queued;
        self.solicit_queue.push_back(itt);
        self.solicit_next()
    }

    /// A command stops soliciting data (complete or aborted).
    fn leave_solicit(&mut self, itt: u32, solicit: Solicit) {
        match solicit {
            Solicit::No => {}
            Solicit::Queued => self.solicit_queue.retain(|&queued| queued != itt),
            Solicit::Active => self.soliciting = self.soliciting.saturating_sub(1),
        }
    }

    /// Sends R2Ts for queued commands while fewer than [`SOLICITING_MAX`] are soliciting.
    fn solicit_next(&mut self) -> Result<(), Fatal> {
        while self.soliciting < SOLICITING_MAX {
            let Some(itt) = self.solicit_queue.pop_front() else {
                return Ok(());
            };
            if let Some(Task::Gathering(gathering)) = self.tasks.get_mut(&itt) {
                gathering.solicit = Solicit::Active;
                self.soliciting += 1;
                self.send_r2t(itt)?;
            }
        }
        Ok(())
    }

    /// Asks for the next burst of `itt`'s data.
    fn send_r2t(&mut self, itt: u32) -> Result<(), Fatal> {
        let ttt = self.new_ttt();
        let max_burst = self.params.max_burst_length.max(512);
        let Some(Task::Gathering(gathering)) = self.tasks.get_mut(&itt) else {
            return Ok(());
        };
        let offset = gathering.data.len() as u32;
        let len = (gathering.expected_out - offset).min(max_burst);
        let mut r2t = Pdu::new(op::R2T);
        r2t.set_flags(FLAG_FINAL);
        r2t.set_lun(gathering.lun_field);
        r2t.set_itt(itt);
        r2t.set_u32(20, ttt);
        r2t.set_u32(36, gathering.r2t_count);
        r2t.set_u32(40, offset);
        r2t.set_u32(44, len);
        gathering.r2t_count += 1;
        gathering.r2t = Some(R2t {
            ttt,
            offset,
            len,
            received: 0,
            next_data_sn: 0,
        });
        self.send(r2t, Stamp::Current)
    }

    fn data_out(&mut self, request: Pdu) -> Result<(), Fatal> {
        let itt = request.itt();
        let ttt = request.u32_at(20);
        let data_sn = request.u32_at(36);
        let offset = request.u32_at(40);
        let len = request.data.len() as u32;
        let Some(Task::Gathering(gathering)) = self.tasks.get_mut(&itt) else {
            // Data for a command refused or aborted before its data came.
            debug!(itt, "Data-Out for no command waiting for data; dropped");
            return Ok(());
        };
        let received = gathering.data.len() as u32;
        let in_order = if ttt == RESERVED_TAG {
            let ok = gathering.unsolicited_open
                && data_sn == gathering.next_unsolicited_data_sn
                && offset == received
                && offset
                    .checked_add(len)
                    .is_some_and(|end| end <= gathering.unsolicited_end);
            gathering.next_unsolicited_data_sn = gathering.next_unsolicited_data_sn.wrapping_add(1);
            if request.final_bit() {
                gathering.unsolicited_open = false;
            }
            ok
        } else {
            match &mut gathering.r2t {
                Some(r2t) if r2t.ttt == ttt => {
                    let ok = data_sn == r2t.next_data_sn
                        && offset == r2t.offset + r2t.received
                        && r2t.received.checked_add(len).is_some_and(|n| n <= r2t.len);
                    r2t.next_data_sn = r2t.next_data_sn.wrapping_add(1);
                    r2t.received += len;
                    ok
                }
                _ => false,
            }
        };
        if !in_order {
            // The command ends with an error and the connection goes on: the initiator
            // learns which command failed, and Data-Out still in flight for it is dropped.
            debug!(
                itt,
                data_sn, offset, "Data-Out out of sequence; command ended"
            );
            if let Some(Task::Gathering(gathering)) = self.tasks.remove(&itt) {
                self.leave_solicit(itt, gathering.solicit);
                let finished = Finished {
                    itt,
                    lun_field: gathering.lun_field,
                    windowed: gathering.windowed,
                    r2t_count: gathering.r2t_count,
                };
                // ABORTED COMMAND, DATA PHASE ERROR (SPC-4 annex D).
                self.answer_now(
                    finished,
                    scsi::check_condition(SenseKey::AbortedCommand, 0x4b, 0x00),
                );
            }
            return self.solicit_next();
        }
        gathering.data.extend_from_slice(&request.data);
        let burst_done = gathering
            .r2t
            .as_ref()
            .is_some_and(|r2t| r2t.received == r2t.len);
        if burst_done {
            gathering.r2t = None;
            if (gathering.data.len() as u32) < gathering.expected_out {
                // More to solicit: keep its place among the soliciting commands.
                return self.send_r2t(itt);
            }
        }
        self.advance_gathering(itt)
    }

    fn task_context(
        &self,
    ) -> (
        mpsc::UnboundedSender<Outgoing>,
        Arc<Mutex<Window>>,
        mpsc::UnboundedSender<u32>,
        SessionParams,
    ) {
        (
            self.out.clone(),
            self.window.clone(),
            self.completions.clone(),
            self.params.clone(),
        )
    }

    /// Runs a command whose data is complete in a task of its own.
    fn start(&mut self, itt: u32, gathering: Gathering) {
        let outcome = Outcome::new();
        self.tasks.insert(
            itt,
            Task::Running {
                outcome: outcome.clone(),
            },
        );
        let Some(lun) = self.lun.clone() else {
            return;
        };
        let (out, window, completions, params) = self.task_context();
        tokio::spawn(async move {
            let command = scsi::Command {
                cdb: &gathering.cdb,
                data_out: &gathering.data,
                expected_in: gathering.expected_in,
                expected_out: gathering.expected_out,
            };
            let response = lun.execute(&command).await;
            let done = Finished {
                itt,
                lun_field: gathering.lun_field,
                windowed: gathering.windowed,
                r2t_count: gathering.r2t_count,
            };
            finish(
                done,
                response,
                &out,
                &window,
                &completions,
                &params,
                Some(&outcome),
            )
            .await;
        });
    }

    /// Answers a command without executing it (refused, or its data went wrong).
    fn answer_now(&mut self, finished: Finished, response: Response) {
        self.tasks.insert(
            finished.itt,
            Task::Running {
                outcome: Outcome::new(),
            },
        );
        let (out, window, completions, params) = self.task_context();
        tokio::spawn(async move {
            finish(
                finished,
                response,
                &out,
                &window,
                &completions,
                &params,
                None,
            )
            .await;
        });
    }

    /// A command's task ended: forget it, and answer task management requests waiting on it.
    fn completed(&mut self, itt: u32) {
        self.tasks.remove(&itt);
        let mut index = 0;
        while index < self.pending_tmfs.len() {
            self.pending_tmfs[index].waiting.remove(&itt);
            if self.pending_tmfs[index].waiting.is_empty() {
                let tmf = self.pending_tmfs.remove(index);
                self.answer_tmf(tmf);
            } else {
                index += 1;
            }
        }
    }

    fn nop_out(&mut self, request: Pdu) -> Result<(), Fatal> {
        if !self.accept_cmd_sn(&request, false) {
            return Ok(());
        }
        if request.itt() == RESERVED_TAG {
            // An answer to our ping (or a ping that wants no answer).
            return Ok(());
        }
        let mut reply = Pdu::new(op::NOP_IN);
        reply.set_flags(FLAG_FINAL);
        reply.set_lun(request.lun());
        reply.set_itt(request.itt());
        reply.set_u32(20, RESERVED_TAG);
        let echo = request
            .data
            .len()
            .min(self.params.initiator_max_recv_data_segment_length as usize);
        reply.data = request.data.slice(..echo);
        self.send(reply, Stamp::Advance)
    }

    fn text(&mut self, request: Pdu) -> Result<(), Fatal> {
        if !self.accept_cmd_sn(&request, false) {
            return Ok(());
        }
        let ttt = request.u32_at(20);
        let body = match (ttt, self.text_pending.take()) {
            // The initiator asks for the rest of a long answer.
            (ttt, Some((pending_ttt, rest))) if ttt == pending_ttt => rest,
            (RESERVED_TAG, _) => self.text_answer(&request.data),
            _ => {
                self.reject(&request.bhs, reject::INVALID_PDU_FIELD, false);
                return Ok(());
            }
        };
        let limit = self.params.initiator_max_recv_data_segment_length.max(512) as usize;
        let mut reply = Pdu::new(op::TEXT_RESPONSE);
        reply.set_lun(request.lun());
        reply.set_itt(request.itt());
        if body.len() > limit {
            // Continue in the next exchange: C bit, and a TTT the initiator sends back.
            let next_ttt = self.new_ttt();
            reply.set_flags(0x40);
            reply.set_u32(20, next_ttt);
            reply.data = Bytes::copy_from_slice(&body[..limit]);
            self.text_pending = Some((next_ttt, body[limit..].to_vec()));
        } else {
            reply.set_flags(FLAG_FINAL);
            reply.set_u32(20, RESERVED_TAG);
            reply.data = Bytes::from(body);
        }
        self.send(reply, Stamp::Advance)
    }

    /// Answers the keys of a Text request: SendTargets, anything else is not understood.
    fn text_answer(&self, data: &[u8]) -> Vec<u8> {
        let mut answer = Vec::new();
        for pair in data.split(|&b| b == 0).filter(|p| !p.is_empty()) {
            let pair = String::from_utf8_lossy(pair);
            let (key, value) = pair.split_once('=').unwrap_or((&pair, ""));
            if key != "SendTargets" {
                answer.extend_from_slice(format!("{key}=NotUnderstood\0").as_bytes());
                continue;
            }
            let address = match self.local {
                SocketAddr::V4(v4) => format!("{}:{},1", v4.ip(), v4.port()),
                SocketAddr::V6(v6) => format!("[{}]:{},1", v6.ip(), v6.port()),
            };
            let targets: Vec<String> = match value {
                "All" => self.portal.targets(),
                // In a normal session, an empty value means the session's own target.
                "" => self
                    .lun
                    .as_ref()
                    .map(|lun| vec![lun.nexus().target_name.clone()])
                    .unwrap_or_default(),
                name if name.starts_with("iqn.") => {
                    if crate::login::TargetDirectory::exists(self.portal.as_ref(), name) {
                        vec![name.to_string()]
                    } else {
                        Vec::new()
                    }
                }
                _ => {
                    answer.extend_from_slice(b"SendTargets=Reject\0");
                    continue;
                }
            };
            for target in targets {
                answer.extend_from_slice(format!("TargetName={target}\0").as_bytes());
                answer.extend_from_slice(format!("TargetAddress={address}\0").as_bytes());
            }
        }
        answer
    }

    fn task_management(&mut self, request: Pdu) -> Result<(), Fatal> {
        if !self.accept_cmd_sn(&request, false) {
            return Ok(());
        }
        const ABORT_TASK: u8 = 1;
        const ABORT_TASK_SET: u8 = 2;
        const CLEAR_ACA: u8 = 3;
        const CLEAR_TASK_SET: u8 = 4;
        const LOGICAL_UNIT_RESET: u8 = 5;
        const TARGET_WARM_RESET: u8 = 6;
        const TARGET_COLD_RESET: u8 = 7;
        // Responses (RFC 7143 11.6.1).
        const FUNCTION_COMPLETE: u8 = 0;
        const TASK_DOES_NOT_EXIST: u8 = 1;
        const LUN_DOES_NOT_EXIST: u8 = 2;
        const FUNCTION_NOT_SUPPORTED: u8 = 5;

        let function = request.flags() & 0x7f;
        let itt = request.itt();
        let lun_known = self.lun.is_some() && pdu::is_lun_zero(request.lun());
        let mut tmf = PendingTmf {
            itt,
            waiting: HashSet::new(),
            response: FUNCTION_COMPLETE,
            reset: false,
        };
        match function {
            _ if !lun_known
                && matches!(
                    function,
                    ABORT_TASK | ABORT_TASK_SET | CLEAR_TASK_SET | LOGICAL_UNIT_RESET
                ) =>
            {
                tmf.response = LUN_DOES_NOT_EXIST;
            }
            ABORT_TASK => {
                let referenced = request.u32_at(20);
                let running = matches!(self.tasks.get(&referenced), Some(Task::Running { .. }));
                let known = self.tasks.contains_key(&referenced);
                if known {
                    tmf.waiting = self.abort_tasks(|tag| tag == referenced);
                }
                if !known || (running && tmf.waiting.is_empty()) {
                    // Never there, or its status already went out.
                    tmf.response = TASK_DOES_NOT_EXIST;
                }
            }
            ABORT_TASK_SET | CLEAR_TASK_SET => {
                tmf.waiting = self.abort_tasks(|_| true);
            }
            LOGICAL_UNIT_RESET | TARGET_WARM_RESET | TARGET_COLD_RESET => {
                tmf.waiting = self.abort_tasks(|_| true);
                tmf.reset = true;
            }
            CLEAR_ACA => {
                // NormACA is not supported, so there is never an ACA to clear.
            }
            _ => tmf.response = FUNCTION_NOT_SUPPORTED,
        }
        if tmf.waiting.is_empty() {
            self.answer_tmf(tmf);
        } else {
            self.pending_tmfs.push(tmf);
        }
        Ok(())
    }

    /// Aborts matching tasks: those still gathering data end now, running ones lose their
    /// response. Returns the running ones to wait for.
    fn abort_tasks(&mut self, matches: impl Fn(u32) -> bool) -> HashSet<u32> {
        let mut waiting = HashSet::new();
        let tags: Vec<u32> = self.tasks.keys().copied().filter(|&t| matches(t)).collect();
        for tag in tags {
            match self.tasks.get(&tag) {
                Some(Task::Running { outcome }) => {
                    if !outcome.abort() {
                        // Already answered: nothing left to abort.
                        continue;
                    }
                    waiting.insert(tag);
                }
                Some(Task::Gathering(_)) => {
                    if let Some(Task::Gathering(gathering)) = self.tasks.remove(&tag) {
                        self.leave_solicit(tag, gathering.solicit);
                        self.release_window(gathering.windowed);
                    }
                }
                None => {}
            }
        }
        let _ = self.solicit_next();
        waiting
    }

    fn answer_tmf(&mut self, tmf: PendingTmf) {
        if tmf.reset {
            if let Some(lun) = &self.lun {
                lun.reset();
            }
        }
        let mut reply = Pdu::new(op::TASK_MANAGEMENT_RESPONSE);
        reply.set_flags(FLAG_FINAL);
        reply.set_byte(2, tmf.response);
        reply.set_itt(tmf.itt);
        let _ = self.send(reply, Stamp::Advance);
    }

    fn logout(&mut self, request: Pdu) {
        let mut reply = Pdu::new(op::LOGOUT_RESPONSE);
        reply.set_flags(FLAG_FINAL);
        // Reason 0 closes the session, 1 the connection: with one connection, the same.
        // Reason 2 (remove for recovery) needs ERL 2.
        let reason = request.flags() & 0x7f;
        reply.set_byte(2, if reason == 2 { 2 } else { 0 });
        reply.set_itt(request.itt());
        // Time2Wait and Time2Retain: nothing to wait for, nothing retained.
        reply.set_u16(40, 0);
        reply.set_u16(42, 0);
        self.send_last(reply, Stamp::Advance);
    }
}

/// Frees a command's place: in the window, or among the immediate commands.
fn release(window: &Mutex<Window>, windowed: bool) {
    let mut window = window.lock();
    if windowed {
        window.in_flight = window.in_flight.saturating_sub(1);
    } else {
        window.immediate = window.immediate.saturating_sub(1);
    }
}

/// What the task of a finished command needs to answer it.
struct Finished {
    itt: u32,
    lun_field: [u8; 8],
    windowed: bool,
    r2t_count: u32,
}

/// Sends a command's data and status (unless it was aborted), then frees its window slot
/// and tells the dispatcher.
async fn finish(
    done: Finished,
    response: Response,
    out: &mpsc::UnboundedSender<Outgoing>,
    window: &Arc<Mutex<Window>>,
    completions: &mpsc::UnboundedSender<u32>,
    params: &SessionParams,
    outcome: Option<&Arc<Outcome>>,
) {
    // The slot is free before the status goes out, so the status opens the window again.
    release(window, done.windowed);
    if outcome.is_none_or(|outcome| outcome.answer()) {
        for pdu in response_pdus(&done, response, params) {
            if out.send(pdu).is_err() {
                break;
            }
        }
    }
    let _ = completions.send(done.itt);
}

/// The Data-In PDUs and status of a command. Status goes in the last Data-In when the
/// command succeeded without sense data (phase collapse), else in a SCSI Response.
fn response_pdus(done: &Finished, response: Response, params: &SessionParams) -> Vec<Outgoing> {
    let mut pdus = Vec::new();
    let data = Bytes::from(response.data_in);
    let segment = params.initiator_max_recv_data_segment_length.max(512) as usize;
    let burst = params.max_burst_length.max(512) as usize;
    let (residual_flags, residual_count) = match response.residual {
        Residual::None => (0u8, 0u32),
        Residual::Overflow(n) => (0x04, n),
        Residual::Underflow(n) => (0x02, n),
    };
    let collapse = response.status == Status::Good && response.sense.is_none();
    let mut offset = 0usize;
    let mut data_sn = 0u32;
    while offset < data.len() {
        let len = segment.min(data.len() - offset);
        // A sequence ends at each MaxBurstLength boundary and at the end.
        let burst_end = (offset / burst + 1) * burst;
        let len = len.min(burst_end - offset);
        let last = offset + len == data.len();
        let mut pdu = Pdu::new(op::DATA_IN);
        let mut flags = 0u8;
        if last || offset + len == burst_end {
            flags |= FLAG_FINAL;
        }
        let mut stamp = Stamp::None;
        if last && collapse {
            flags |= 0x01 | residual_flags;
            pdu.set_byte(3, response.status as u8);
            pdu.set_u32(44, residual_count);
            stamp = Stamp::Advance;
        }
        pdu.set_flags(flags);
        pdu.set_lun(done.lun_field);
        pdu.set_itt(done.itt);
        pdu.set_u32(20, RESERVED_TAG);
        pdu.set_u32(36, data_sn);
        pdu.set_u32(40, offset as u32);
        pdu.data = data.slice(offset..offset + len);
        pdus.push(Outgoing {
            pdu,
            stamp,
            last: false,
        });
        offset += len;
        data_sn += 1;
    }
    if data.is_empty() || !collapse {
        let mut pdu = Pdu::new(op::SCSI_RESPONSE);
        pdu.set_flags(FLAG_FINAL | residual_flags);
        pdu.set_byte(2, 0x00);
        pdu.set_byte(3, response.status as u8);
        pdu.set_itt(done.itt);
        pdu.set_u32(36, data_sn + done.r2t_count);
        pdu.set_u32(44, residual_count);
        if let Some(sense) = response.sense {
            let mut segment = Vec::with_capacity(2 + sense.len());
            segment.extend_from_slice(&(sense.len() as u16).to_be_bytes());
            segment.extend_from_slice(&sense);
            pdu.data = Bytes::from(segment);
        }
        pdus.push(Outgoing {
            pdu,
            stamp: Stamp::Advance,
            last: false,
        });
    }
    pdus
}

/// The extra CDB bytes of an extended-CDB AHS (RFC 7143 11.3.3), if any.
fn extended_cdb(ahs: &[u8]) -> Option<&[u8]> {
    let mut at = 0;
    while at + 3 <= ahs.len() {
        let length = u16::from_be_bytes([ahs[at], ahs[at + 1]]) as usize;
        let kind = ahs[at + 2];
        let body = ahs.get(at + 3..at + 3 + length)?;
        if kind == 1 {
            // The length counts the reserved byte before the CDB bytes.
            return body.get(1..);
        }
        at += 3 + length + pdu::padding(3 + length);
    }
    None
}

/// The answer for a LUN other than 0: INQUIRY reports no device there (SPC-4 6.6.2,
/// peripheral qualifier 011b); anything else is refused.
fn no_such_lun(cdb: &[u8], expected_in: u32) -> Response {
    const INQUIRY: u8 = 0x12;
    match cdb.first() {
        Some(&INQUIRY) => {
            let mut data = vec![0u8; 36];
            data[0] = 0x7f;
            data[3] = 0x02;
            data[4] = 31;
            let allocation = u16::from_be_bytes([cdb[3], cdb[4]]) as usize;
            let len = data.len().min(allocation).min(expected_in as usize);
            data.truncate(len);
            let residual = if (len as u32) < expected_in {
                Residual::Underflow(expected_in - len as u32)
            } else {
                Residual::None
            };
            Response {
                status: Status::Good,
                data_in: data,
                sense: None,
                residual,
            }
        }
        _ => scsi::check_condition(SenseKey::IllegalRequest, 0x25, 0x00),
    }
}
