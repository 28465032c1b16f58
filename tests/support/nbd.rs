//! A deliberately small NBD client over raw TCP, written from the protocol specification
//! (NetworkBlockDevice/nbd, doc/proto.md), for the cases real clients never produce: malformed
//! handshakes, hostile lengths, requests past the end, abrupt disconnects, and precise checks of
//! error values (EPERM, EINVAL) and transmission flags.
//!
//! It negotiates fixed newstyle without structured replies, so every transmission reply is a
//! simple reply, and it keeps one request in flight at a time unless a test pipelines on purpose.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;

pub const INFO_EXPORT: u16 = 0;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;

/// How long the client waits for any single answer before calling the server hung.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
pub struct ExportInfo {
    pub size_bytes: u64,
    pub flags: u16,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }
}

#[derive(Debug, Clone)]
pub struct OptionReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

impl OptionReply {
    pub fn is_error(&self) -> bool {
        self.kind & REP_FLAG_ERROR != 0
    }
}

/// What the server did after a provocation.
#[derive(Debug)]
pub enum Reaction {
    /// The connection was closed (EOF or reset).
    Closed,
    /// The server sent these bytes (and may still be connected).
    Answered(Vec<u8>),
    /// Nothing at all within the timeout.
    Silent,
}

pub struct Conn {
    stream: TcpStream,
    next_handle: u64,
}

impl Conn {
    pub fn connect(port: u16) -> Conn {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to grove NBD port");
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .expect("set_read_timeout");
        stream
            .set_write_timeout(Some(ANSWER_TIMEOUT))
            .expect("set_write_timeout");
        stream.set_nodelay(true).expect("set_nodelay");
        Conn {
            stream,
            next_handle: 1,
        }
    }

    /// A second handle on the same connection, to read replies while another thread sends.
    pub fn try_clone(&self) -> Conn {
        Conn {
            stream: self.stream.try_clone().expect("clone the NBD socket"),
            next_handle: self.next_handle,
        }
    }

    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    pub fn recv_exact(&mut self, length: usize) -> std::io::Result<Vec<u8>> {
        let mut buffer = vec![0u8; length];
        self.stream.read_exact(&mut buffer)?;
        Ok(buffer)
    }

    fn recv_u16(&mut self) -> std::io::Result<u16> {
        let bytes = self.recv_exact(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn recv_u32(&mut self) -> std::io::Result<u32> {
        let bytes = self.recv_exact(4)?;
        Ok(u32::from_be_bytes(bytes.try_into().expect("4 bytes")))
    }

    fn recv_u64(&mut self) -> std::io::Result<u64> {
        let bytes = self.recv_exact(8)?;
        Ok(u64::from_be_bytes(bytes.try_into().expect("8 bytes")))
    }

    /// Reads the newstyle greeting and returns the handshake flags.
    pub fn greeting(&mut self) -> u16 {
        let magic = self.recv_u64().expect("read NBDMAGIC");
        assert_eq!(magic, NBDMAGIC, "server greeting must start with NBDMAGIC");
        let option_magic = self.recv_u64().expect("read IHAVEOPT");
        assert_eq!(
            option_magic, IHAVEOPT,
            "server must use (fixed) newstyle negotiation"
        );
        let flags = self.recv_u16().expect("read handshake flags");
        assert!(
            flags & FLAG_FIXED_NEWSTYLE != 0,
            "server must advertise NBD_FLAG_FIXED_NEWSTYLE"
        );
        flags
    }

    /// Greeting plus client flags: ready for option haggling. Returns the handshake flags.
    pub fn start_options(&mut self) -> u16 {
        let flags = self.greeting();
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if flags & FLAG_NO_ZEROES != 0 {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        self.send(&client_flags.to_be_bytes())
            .expect("send client flags");
        flags
    }

    pub fn send_option_raw(
        &mut self,
        magic: u64,
        option: u32,
        length: u32,
        data: &[u8],
    ) -> std::io::Result<()> {
        let mut bytes = Vec::with_capacity(16 + data.len());
        bytes.extend_from_slice(&magic.to_be_bytes());
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes.extend_from_slice(data);
        self.send(&bytes)
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let length = u32::try_from(data.len()).expect("option data fits u32");
        self.send_option_raw(IHAVEOPT, option, length, data)
            .expect("send option");
    }

    pub fn option_reply(&mut self) -> std::io::Result<OptionReply> {
        let magic = self.recv_u64()?;
        assert_eq!(
            magic, OPTION_REPLY_MAGIC,
            "option reply must start with the reply magic 0x3e889045565a9"
        );
        let option = self.recv_u32()?;
        let kind = self.recv_u32()?;
        let length = self.recv_u32()?;
        assert!(
            length <= 64 * 1024,
            "option reply length {length} is unreasonable"
        );
        let data = self.recv_exact(length as usize)?;
        Ok(OptionReply { option, kind, data })
    }

    /// NBD_OPT_GO for `name`, asking for no extra information. Returns the export's size and
    /// transmission flags, or the server's error reply.
    pub fn go(&mut self, name: &str) -> Result<ExportInfo, OptionReply> {
        let mut data = Vec::new();
        data.extend_from_slice(&(name.len() as u32).to_be_bytes());
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &data);
        let mut export = None;
        loop {
            let reply = self.option_reply().expect("read reply to NBD_OPT_GO");
            assert_eq!(
                reply.option, OPT_GO,
                "reply must name the option it answers"
            );
            if reply.is_error() {
                return Err(reply);
            }
            match reply.kind {
                REP_INFO => {
                    assert!(reply.data.len() >= 2, "NBD_REP_INFO too short");
                    let info_type = u16::from_be_bytes([reply.data[0], reply.data[1]]);
                    if info_type == INFO_EXPORT {
                        assert_eq!(reply.data.len(), 12, "NBD_INFO_EXPORT is 12 bytes");
                        let size_bytes =
                            u64::from_be_bytes(reply.data[2..10].try_into().expect("8 bytes"));
                        let flags = u16::from_be_bytes([reply.data[10], reply.data[11]]);
                        export = Some(ExportInfo { size_bytes, flags });
                    }
                }
                REP_ACK => {
                    return Ok(export.expect("server must send NBD_INFO_EXPORT before ACK"));
                }
                other => panic!("unexpected reply type {other:#x} to NBD_OPT_GO"),
            }
        }
    }

    /// NBD_OPT_LIST: the export names the server announces.
    pub fn list(&mut self) -> Vec<String> {
        self.send_option(OPT_LIST, &[]);
        let mut names = Vec::new();
        loop {
            let reply = self.option_reply().expect("read reply to NBD_OPT_LIST");
            assert_eq!(reply.option, OPT_LIST);
            match reply.kind {
                REP_SERVER => {
                    assert!(reply.data.len() >= 4, "NBD_REP_SERVER too short");
                    let length =
                        u32::from_be_bytes(reply.data[0..4].try_into().expect("4 bytes")) as usize;
                    let name = String::from_utf8_lossy(&reply.data[4..4 + length]).into_owned();
                    names.push(name);
                }
                REP_ACK => return names,
                other => panic!("unexpected reply type {other:#x} to NBD_OPT_LIST"),
            }
        }
    }

    /// Sends one request header (and payload for writes) exactly as given.
    pub fn send_request(
        &mut self,
        magic: u32,
        flags: u16,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> std::io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut bytes = Vec::with_capacity(28 + payload.len());
        bytes.extend_from_slice(&magic.to_be_bytes());
        bytes.extend_from_slice(&flags.to_be_bytes());
        bytes.extend_from_slice(&command.to_be_bytes());
        bytes.extend_from_slice(&handle.to_be_bytes());
        bytes.extend_from_slice(&offset.to_be_bytes());
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes.extend_from_slice(payload);
        self.send(&bytes)?;
        Ok(handle)
    }

    /// Reads one simple reply and returns its error value (0 on success).
    pub fn simple_reply(&mut self, expected_handle: u64) -> std::io::Result<u32> {
        let magic = self.recv_u32()?;
        assert_eq!(
            magic, SIMPLE_REPLY_MAGIC,
            "without NBD_OPT_STRUCTURED_REPLY the server must send simple replies"
        );
        let error = self.recv_u32()?;
        let handle = self.recv_u64()?;
        assert_eq!(
            handle, expected_handle,
            "reply must carry the request handle"
        );
        Ok(error)
    }

    /// Reads one simple reply header in any order: `(error, handle)`.
    pub fn any_simple_reply(&mut self) -> std::io::Result<(u32, u64)> {
        let magic = self.recv_u32()?;
        assert_eq!(
            magic, SIMPLE_REPLY_MAGIC,
            "without NBD_OPT_STRUCTURED_REPLY the server must send simple replies"
        );
        let error = self.recv_u32()?;
        let handle = self.recv_u64()?;
        Ok((error, handle))
    }

    /// NBD_CMD_READ: `Ok(Ok(data))`, `Ok(Err(errno))`, or an I/O error if the server hung up.
    pub fn read(&mut self, offset: u64, length: u32) -> std::io::Result<Result<Vec<u8>, u32>> {
        let handle = self.send_request(REQUEST_MAGIC, 0, CMD_READ, offset, length, &[])?;
        let error = self.simple_reply(handle)?;
        if error != 0 {
            return Ok(Err(error));
        }
        Ok(Ok(self.recv_exact(length as usize)?))
    }

    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> std::io::Result<u32> {
        let length = u32::try_from(data.len()).expect("write fits u32");
        let handle = self.send_request(REQUEST_MAGIC, flags, CMD_WRITE, offset, length, data)?;
        self.simple_reply(handle)
    }

    /// A command without payload (FLUSH, TRIM, WRITE_ZEROES, CACHE, ...).
    pub fn command(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> std::io::Result<u32> {
        let handle = self.send_request(REQUEST_MAGIC, flags, command, offset, length, &[])?;
        self.simple_reply(handle)
    }

    pub fn flush(&mut self) -> std::io::Result<u32> {
        self.command(CMD_FLUSH, 0, 0, 0)
    }

    /// NBD_CMD_DISC: the polite end of a session.
    /// Sends NBD_CMD_DISC and waits (up to 10 s) for the server to close the connection,
    /// which it does once the session is over.
    pub fn disconnect(mut self) {
        let _ = self.send_request(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, &[]);
        let _ = self.stream.shutdown(Shutdown::Write);
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(10)));
        let mut sink = [0u8; 4096];
        while matches!(self.stream.read(&mut sink), Ok(n) if n > 0) {}
    }

    /// Half-closes the connection: the server sees end of input, replies can still arrive.
    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Waits up to `timeout` for the server to answer or close, collecting what it sends.
    pub fn reaction(&mut self, timeout: Duration) -> Reaction {
        let deadline = Instant::now() + timeout;
        let mut received = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            self.stream
                .set_read_timeout(Some(remaining.min(Duration::from_millis(500))))
                .expect("set_read_timeout");
            let mut buffer = [0u8; 4096];
            match self.stream.read(&mut buffer) {
                Ok(0) => {
                    if received.is_empty() {
                        return Reaction::Closed;
                    }
                    break;
                }
                Ok(count) => {
                    received.extend_from_slice(&buffer[..count]);
                    if received.len() > 1024 * 1024 {
                        break;
                    }
                }
                Err(error)
                    if error.kind() == ErrorKind::WouldBlock
                        || error.kind() == ErrorKind::TimedOut =>
                {
                    if !received.is_empty() {
                        break;
                    }
                }
                Err(_) => {
                    if received.is_empty() {
                        return Reaction::Closed;
                    }
                    break;
                }
            }
        }
        self.stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .expect("set_read_timeout");
        if received.is_empty() {
            Reaction::Silent
        } else {
            Reaction::Answered(received)
        }
    }

    /// Drops the connection without any protocol-level goodbye.
    /// Shuts the connection down without NBD_CMD_DISC; returns the client address the
    /// server knows this connection by.
    pub fn hang_up(self) -> String {
        let address = self
            .stream
            .local_addr()
            .map(|address| address.to_string())
            .unwrap_or_default();
        let _ = self.stream.shutdown(Shutdown::Both);
        address
    }
}

/// Connects, negotiates and enters transmission on `export` with NBD_OPT_GO.
pub fn open(port: u16, export: &str) -> (Conn, ExportInfo) {
    let mut conn = Conn::connect(port);
    conn.start_options();
    let info = conn
        .go(export)
        .unwrap_or_else(|reply| panic!("NBD_OPT_GO {export:?} refused: {reply:?}"));
    (conn, info)
}
