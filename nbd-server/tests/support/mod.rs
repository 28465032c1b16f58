//! A deliberately small NBD client and a server fixture for the integration tests. The client
//! trusts nothing: it checks magics and lengths and fails the test on anything unexpected.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use grove_nbd_server::proto::*;
use grove_nbd_server::{serve_unix_with, MemoryProvider, ServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

/// How long any single read in a test may take before the test fails instead of hanging.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// Server logs go to the test output when `RUST_LOG` is set (e.g. `RUST_LOG=trace`).
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A server over an in-memory provider on a Unix socket in a temporary directory.
pub struct Server {
    pub provider: Arc<MemoryProvider>,
    pub socket_path: PathBuf,
    task: JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(ServerOptions::default()).await
    }

    pub async fn start_with(options: ServerOptions) -> Server {
        init_logging();
        let provider = Arc::new(MemoryProvider::new());
        provider.add_export("vol", 16 << 20, false);
        provider.add_export("vol@v1", 16 << 20, true);
        provider.add_export("big", 8 << 40, false);
        let dir = tempfile::tempdir().unwrap();
        let socket_path = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket_path).unwrap();
        let task = tokio::spawn(serve_unix_with(provider.clone(), listener, options));
        Server {
            provider,
            socket_path,
            task,
            _dir: dir,
        }
    }

    pub async fn raw(&self) -> UnixStream {
        UnixStream::connect(&self.socket_path).await.unwrap()
    }

    /// Connects and completes the greeting with the usual client flags.
    pub async fn client(&self) -> Client {
        Client::greet(
            self.raw().await,
            NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES,
        )
        .await
    }

    /// A connected client in transmission on `export` with `mode` and, if chunked,
    /// `base:allocation` selected.
    pub async fn session(&self, export: &str, mode: ReplyMode) -> Client {
        session(&self.socket_path, export, mode).await
    }

    /// Checks the server still serves: a new client writes and reads back.
    pub async fn assert_serving(&self) {
        let mut client = self.session("vol", ReplyMode::Structured).await;
        let pattern = vec![0x5au8; 4096];
        let outcome = client
            .call(Command::Write, 0, 8 << 20, 4096, &pattern)
            .await;
        assert_eq!(outcome.error, 0);
        let outcome = client.call(Command::Read, 0, 8 << 20, 4096, &[]).await;
        assert_eq!(outcome.error, 0);
        assert_eq!(outcome.data, pattern);
        client.disconnect().await;
    }

    /// Waits until every export handle is closed (connection tasks finish asynchronously).
    pub async fn wait_handles_closed(&self) {
        for _ in 0..200 {
            if self.provider.open_handles() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "export handles still open: {}",
            self.provider.open_handles()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects to the Unix socket at `path`, negotiates `mode` (and `base:allocation` when
/// chunked) and enters transmission on `export`.
pub async fn session(path: &std::path::Path, export: &str, mode: ReplyMode) -> Client {
    let stream = UnixStream::connect(path).await.unwrap();
    let mut client = Client::greet(stream, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).await;
    match mode {
        ReplyMode::Simple => {}
        ReplyMode::Structured => {
            assert_eq!(
                client
                    .option(NBD_OPT_STRUCTURED_REPLY, &[])
                    .await
                    .last_type(),
                NBD_REP_ACK
            )
        }
        ReplyMode::Extended => {
            assert_eq!(
                client
                    .option(NBD_OPT_EXTENDED_HEADERS, &[])
                    .await
                    .last_type(),
                NBD_REP_ACK
            )
        }
    }
    if mode.chunked() {
        let request = MetaContextRequest {
            name: export.into(),
            queries: vec![BASE_ALLOCATION.into()],
        };
        let replies = client
            .option(NBD_OPT_SET_META_CONTEXT, &request.encode())
            .await;
        assert_eq!(replies.last_type(), NBD_REP_ACK);
    }
    client.go(export, &[]).await.expect("GO succeeds");
    client
}

/// All replies to one option.
#[derive(Debug)]
pub struct OptionReplies(pub Vec<OptionReply>);

#[derive(Debug, Clone)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

impl OptionReplies {
    pub fn last_type(&self) -> u32 {
        self.0.last().unwrap().reply_type
    }

    pub fn of_type(&self, reply_type: u32) -> Vec<&OptionReply> {
        self.0
            .iter()
            .filter(|reply| reply.reply_type == reply_type)
            .collect()
    }

    /// `NBD_REP_INFO` payloads by information type.
    pub fn info(&self, info_type: u16) -> Option<Vec<u8>> {
        self.of_type(NBD_REP_INFO)
            .into_iter()
            .find(|reply| u16::from_be_bytes([reply.data[0], reply.data[1]]) == info_type)
            .map(|reply| reply.data[2..].to_vec())
    }
}

/// What the server said about an export when entering transmission.
#[derive(Debug, Clone, Copy)]
pub struct ExportSummary {
    pub size_bytes: u64,
    pub flags: u16,
}

/// The complete reply to one request.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub cookie: u64,
    pub error: u32,
    pub message: String,
    /// For reads: the assembled data (holes as zeros).
    pub data: Vec<u8>,
    /// Chunk types in arrival order (empty for simple replies).
    pub chunk_types: Vec<u16>,
    /// Block status descriptors `(length, flags)` of every chunk, in arrival order.
    pub descriptors: Vec<(u64, u64)>,
    /// The context id of the last block status chunk.
    pub context_id: Option<u32>,
    /// Block status chunks as `(context id, descriptors)`, in arrival order.
    pub contexts: Vec<(u32, Vec<(u64, u64)>)>,
}

pub struct Client {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    pub mode: ReplyMode,
    next_cookie: u64,
    /// Outstanding requests: cookie to (command, offset, length).
    requests: HashMap<u64, (Command, u64, u64)>,
    partial: HashMap<u64, Outcome>,
}

impl Client {
    /// Like [`Client::greet`], but `None` if the server closes before its greeting (a
    /// connection refused at the connection limit).
    pub async fn try_greet(stream: UnixStream, client_flags: u32) -> Option<Client> {
        let (reader, writer) = stream.into_split();
        let mut client = Client {
            reader,
            writer,
            mode: ReplyMode::Simple,
            next_cookie: 1,
            requests: HashMap::new(),
            partial: HashMap::new(),
        };
        let mut greeting = [0u8; 18];
        let read = tokio::time::timeout(STEP_TIMEOUT, client.reader.read_exact(&mut greeting))
            .await
            .expect("server answered in time");
        if read.is_err() {
            return None;
        }
        assert_eq!(&greeting[0..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([greeting[16], greeting[17]]),
            NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
        );
        client
            .writer
            .write_all(&client_flags.to_be_bytes())
            .await
            .unwrap();
        Some(client)
    }

    /// Reads the greeting and sends `client_flags`.
    pub async fn greet(stream: UnixStream, client_flags: u32) -> Client {
        Client::try_greet(stream, client_flags)
            .await
            .expect("the server greets")
    }

    pub async fn read_exact(&mut self, buf: &mut [u8]) {
        tokio::time::timeout(STEP_TIMEOUT, self.reader.read_exact(buf))
            .await
            .expect("server answered in time")
            .expect("server sent the expected bytes");
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// True if the server closed the connection (end of stream or reset) within the step
    /// timeout, after consuming anything it still sends.
    pub async fn closed(&mut self) -> bool {
        let mut sink = [0u8; 4096];
        loop {
            match tokio::time::timeout(STEP_TIMEOUT, self.reader.read(&mut sink)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut bytes = Vec::new();
        put_u64(&mut bytes, IHAVEOPT);
        put_u32(&mut bytes, option);
        put_u32(&mut bytes, data.len() as u32);
        bytes.extend_from_slice(data);
        self.send(&bytes).await;
    }

    pub async fn option_reply(&mut self) -> OptionReply {
        let mut header = [0u8; 20];
        self.read_exact(&mut header).await;
        assert_eq!(&header[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
        let reply_type = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data).await;
        OptionReply {
            option,
            reply_type,
            data,
        }
    }

    /// Sends an option and reads replies up to the final one (ACK or an error).
    pub async fn option(&mut self, option: u32, data: &[u8]) -> OptionReplies {
        self.send_option(option, data).await;
        let mut replies = Vec::new();
        loop {
            let reply = self.option_reply().await;
            assert_eq!(reply.option, option);
            let done =
                reply.reply_type == NBD_REP_ACK || reply.reply_type & NBD_REP_FLAG_ERROR != 0;
            replies.push(reply);
            if done {
                break;
            }
        }
        if option == NBD_OPT_STRUCTURED_REPLY && replies.last().unwrap().reply_type == NBD_REP_ACK {
            self.mode = ReplyMode::Structured;
        }
        if option == NBD_OPT_EXTENDED_HEADERS && replies.last().unwrap().reply_type == NBD_REP_ACK {
            self.mode = ReplyMode::Extended;
        }
        OptionReplies(replies)
    }

    /// `NBD_OPT_GO`; on success the client is in transmission.
    pub async fn go(
        &mut self,
        name: &str,
        info_types: &[u16],
    ) -> Result<ExportSummary, OptionReplies> {
        let request = InfoRequest {
            name: name.into(),
            info_types: info_types.to_vec(),
        };
        let replies = self.option(NBD_OPT_GO, &request.encode()).await;
        if replies.last_type() != NBD_REP_ACK {
            return Err(replies);
        }
        let export = replies
            .info(NBD_INFO_EXPORT)
            .expect("NBD_INFO_EXPORT before ACK");
        assert_eq!(export.len(), 10);
        Ok(ExportSummary {
            size_bytes: u64::from_be_bytes(export[0..8].try_into().unwrap()),
            flags: u16::from_be_bytes(export[8..10].try_into().unwrap()),
        })
    }

    pub fn header(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u64,
    ) -> (u64, Vec<u8>) {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let bytes = if self.mode == ReplyMode::Extended {
            header.encode_extended().to_vec()
        } else {
            header.encode_compact().to_vec()
        };
        (cookie, bytes)
    }

    /// Sends a request (and its payload) without waiting; returns the cookie. In extended
    /// mode a payload sets `NBD_CMD_FLAG_PAYLOAD_LEN`.
    pub async fn request(
        &mut self,
        command: Command,
        mut flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> u64 {
        if self.mode == ReplyMode::Extended && !payload.is_empty() {
            flags |= NBD_CMD_FLAG_PAYLOAD_LEN;
        }
        let (cookie, mut bytes) = self.header(command, flags, offset, length);
        bytes.extend_from_slice(payload);
        self.send(&bytes).await;
        self.requests.insert(cookie, (command, offset, length));
        cookie
    }

    /// Reads messages until some request's reply is complete.
    pub async fn next_outcome(&mut self) -> Outcome {
        loop {
            let mut magic = [0u8; 4];
            self.read_exact(&mut magic).await;
            match u32::from_be_bytes(magic) {
                NBD_SIMPLE_REPLY_MAGIC => {
                    let mut rest = [0u8; 12];
                    self.read_exact(&mut rest).await;
                    let error = u32::from_be_bytes(rest[0..4].try_into().unwrap());
                    let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
                    let (command, _, length) = self
                        .requests
                        .remove(&cookie)
                        .expect("reply to a pending request");
                    assert_ne!(
                        self.mode,
                        ReplyMode::Extended,
                        "simple reply in extended mode"
                    );
                    let mut outcome = Outcome {
                        cookie,
                        error,
                        ..Outcome::default()
                    };
                    if command == Command::Read {
                        assert_eq!(
                            self.mode,
                            ReplyMode::Simple,
                            "simple reply to READ with structured replies"
                        );
                        if error == 0 {
                            let mut data = vec![0u8; length as usize];
                            self.read_exact(&mut data).await;
                            outcome.data = data;
                        }
                    }
                    return outcome;
                }
                magic @ (NBD_STRUCTURED_REPLY_MAGIC | NBD_EXTENDED_REPLY_MAGIC) => {
                    let extended = magic == NBD_EXTENDED_REPLY_MAGIC;
                    assert_eq!(
                        extended,
                        self.mode == ReplyMode::Extended,
                        "reply header matches the mode"
                    );
                    let mut rest = vec![0u8; if extended { 28 } else { 16 }];
                    self.read_exact(&mut rest).await;
                    let flags = u16::from_be_bytes(rest[0..2].try_into().unwrap());
                    let chunk_type = u16::from_be_bytes(rest[2..4].try_into().unwrap());
                    let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
                    let payload_len = if extended {
                        let request_offset = u64::from_be_bytes(rest[12..20].try_into().unwrap());
                        let (_, offset, _) = self.requests[&cookie];
                        assert_eq!(
                            request_offset, offset,
                            "extended reply repeats the request offset"
                        );
                        u64::from_be_bytes(rest[20..28].try_into().unwrap())
                    } else {
                        u64::from(u32::from_be_bytes(rest[12..16].try_into().unwrap()))
                    };
                    assert!(payload_len <= 64 << 20, "reply payload of sane size");
                    let mut payload = vec![0u8; payload_len as usize];
                    self.read_exact(&mut payload).await;
                    let (command, offset, length) = self.requests[&cookie];
                    let outcome = self.partial.entry(cookie).or_insert_with(|| Outcome {
                        cookie,
                        data: if command == Command::Read {
                            vec![0u8; length as usize]
                        } else {
                            Vec::new()
                        },
                        ..Outcome::default()
                    });
                    outcome.chunk_types.push(chunk_type);
                    apply_chunk(outcome, chunk_type, &payload, offset, length, extended);
                    if flags & NBD_REPLY_FLAG_DONE != 0 {
                        self.requests.remove(&cookie);
                        return self.partial.remove(&cookie).unwrap();
                    }
                }
                other => panic!("bad reply magic {other:#x}"),
            }
        }
    }

    /// Sends a request and waits for its reply (nothing else may be pending).
    pub async fn call(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Outcome {
        let cookie = self.request(command, flags, offset, length, payload).await;
        let outcome = self.next_outcome().await;
        assert_eq!(outcome.cookie, cookie);
        outcome
    }

    /// Sends `NBD_CMD_DISC` and checks the server closes the connection.
    pub async fn disconnect(mut self) {
        let (_, bytes) = self.header(Command::Disc, 0, 0, 0);
        self.send(&bytes).await;
        assert!(self.closed().await, "server closes after NBD_CMD_DISC");
    }
}

fn apply_chunk(
    outcome: &mut Outcome,
    chunk_type: u16,
    payload: &[u8],
    offset: u64,
    length: u64,
    extended: bool,
) {
    let be64 = |bytes: &[u8]| u64::from_be_bytes(bytes[..8].try_into().unwrap());
    let be32 = |bytes: &[u8]| u32::from_be_bytes(bytes[..4].try_into().unwrap());
    match chunk_type {
        NBD_REPLY_TYPE_NONE => assert!(payload.is_empty()),
        NBD_REPLY_TYPE_OFFSET_DATA => {
            assert!(payload.len() > 8, "OFFSET_DATA carries at least one byte");
            let at = be64(payload);
            let data = &payload[8..];
            assert!(
                at >= offset && at + data.len() as u64 <= offset + length,
                "data inside the request"
            );
            let start = (at - offset) as usize;
            outcome.data[start..start + data.len()].copy_from_slice(data);
        }
        NBD_REPLY_TYPE_OFFSET_HOLE => {
            assert_eq!(payload.len(), 12);
            let at = be64(payload);
            let size = u64::from(be32(&payload[8..]));
            assert!(size > 0);
            assert!(
                at >= offset && at + size <= offset + length,
                "hole inside the request"
            );
            let start = (at - offset) as usize;
            outcome.data[start..start + size as usize].fill(0);
        }
        NBD_REPLY_TYPE_BLOCK_STATUS => {
            assert!(!extended);
            assert!(payload.len() >= 12 && (payload.len() - 4).is_multiple_of(8));
            outcome.context_id = Some(be32(payload));
            let mut descriptors = Vec::new();
            for descriptor in payload[4..].chunks(8) {
                descriptors.push((
                    u64::from(be32(descriptor)),
                    u64::from(be32(&descriptor[4..])),
                ));
            }
            outcome.descriptors.extend_from_slice(&descriptors);
            outcome.contexts.push((be32(payload), descriptors));
        }
        NBD_REPLY_TYPE_BLOCK_STATUS_EXT => {
            assert!(extended);
            assert!(payload.len() >= 24 && (payload.len() - 8).is_multiple_of(16));
            outcome.context_id = Some(be32(payload));
            let count = be32(&payload[4..]) as usize;
            assert_eq!(count * 16 + 8, payload.len());
            let mut descriptors = Vec::new();
            for descriptor in payload[8..].chunks(16) {
                descriptors.push((be64(descriptor), be64(&descriptor[8..])));
            }
            outcome.descriptors.extend_from_slice(&descriptors);
            outcome.contexts.push((be32(payload), descriptors));
        }
        NBD_REPLY_TYPE_ERROR => {
            let error = be32(payload);
            assert_ne!(error, 0);
            let message_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
            assert_eq!(payload.len(), 6 + message_len);
            outcome.error = error;
            outcome.message = String::from_utf8(payload[6..].to_vec()).unwrap();
        }
        other => panic!("unexpected chunk type {other}"),
    }
}
