//! grove's NBD server: speaks the Network Block Device protocol (fixed newstyle handshake,
//! structured replies, extended headers, block status for `base:allocation` and for the
//! differences from another ref (`grove:diff:REF`, also offered as QEMU's
//! `qemu:dirty-bitmap:REF`), pipelined out-of-order transmission) and turns every request
//! into a call on an engine session.
//!
//! Export names are refs: `VOL` and `VOL@BRANCH` are writable, `VOL@TAG` and `VOL@COMMIT`
//! (full id or unique prefix) read-only; `NBD_OPT_LIST` lists every ref of every volume.
//!
//! The crate only translates a protocol. It never interprets, caches or rewrites data; it
//! never acknowledges a request before the engine completed it, and leaves durability to the
//! engine (FLUSH and FUA go straight through; a clean `NBD_CMD_DISC` adds one flush). It never
//! lets one client's input panic the server, hang it, grow its memory without bound, or affect
//! another connection. It depends on no workspace crate but `grove-engine`.
//!
//! Entry points: [`serve_tcp`] and [`serve_unix`] serve a [`grove_engine::Pool`];
//! [`serve_tcp_with`], [`serve_unix_with`] and [`serve_connection`] serve any
//! [`ExportProvider`] with explicit [`ServerOptions`].

pub mod error;
pub mod export;
mod handshake;
pub mod memory;
mod meta;
mod payload;
pub mod proto;
mod transmission;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use grove_engine::{Pool, SessionClient};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, info_span, warn, Instrument};

pub use error::Error;
pub use export::{
    DiffBase, DiffCandidates, ExportHandle, ExportProvider, PoolExport, PoolProvider,
};
pub use memory::MemoryProvider;

/// Limits of the server. Every field is a bound the server keeps per connection (or per
/// listener for `connections_max`); `Default` gives the documented defaults.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Time from accepting a connection to the client entering transmission or aborting.
    /// Default 30 s.
    pub handshake_timeout: Duration,
    /// Options one handshake may send before the connection is closed. Default 4096 (enough
    /// for `NBD_OPT_INFO` on every export of a large pool); at least 1.
    pub handshake_options_max: u32,
    /// Requests of one connection between being read and their reply being written. When
    /// reached, the server stops reading the connection. Default 64; 1 to 65536.
    pub in_flight_requests_max: usize,
    /// Payload bytes of one connection in flight (write data held, read data to send).
    /// Default 64 MiB; at least the 32 MiB maximum payload, at most 1 GiB.
    pub in_flight_bytes_max: usize,
    /// How long one write of replies may make no progress before the connection is closed
    /// (a client that stopped reading). Default 120 s; at least 1 s.
    pub reply_write_timeout: Duration,
    /// Connections served at once by one listener; more are closed right after accept.
    /// Default 1024; at least 1.
    pub connections_max: usize,
    /// Turns true to stop the server gracefully: listeners stop accepting, connections stop
    /// reading requests, finish and answer those already read, flush, and close; the serve
    /// functions return once every connection is closed. Default: none (serve until dropped).
    pub stop: Option<watch::Receiver<bool>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            handshake_timeout: Duration::from_secs(30),
            handshake_options_max: 4096,
            in_flight_requests_max: 64,
            in_flight_bytes_max: 64 << 20,
            reply_write_timeout: Duration::from_secs(120),
            connections_max: 1024,
            stop: None,
        }
    }
}

/// Completes once `stop` turns true; never without one (or once its sender is gone without
/// asking to stop).
pub(crate) async fn stop_requested(stop: &Option<watch::Receiver<bool>>) {
    if let Some(stop) = stop {
        let mut stop = stop.clone();
        if stop.wait_for(|stopping| *stopping).await.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await
}

/// Waits until every connection of a listener has closed (each holds a permit).
async fn drained(connections: &Semaphore, connections_max: usize) {
    let all = u32::try_from(connections_max).unwrap_or(u32::MAX);
    let _all = connections.acquire_many(all).await;
}

impl ServerOptions {
    /// The options with every field pulled into its documented range.
    pub fn clamped(mut self) -> Self {
        self.handshake_options_max = self.handshake_options_max.max(1);
        self.in_flight_requests_max = self.in_flight_requests_max.clamp(1, 1 << 16);
        self.in_flight_bytes_max = self
            .in_flight_bytes_max
            .clamp(proto::PAYLOAD_MAX_BYTES as usize, 1 << 30);
        self.connections_max = self.connections_max.max(1);
        self.reply_write_timeout = self.reply_write_timeout.max(REPLY_WRITE_TIMEOUT_MIN);
        self
    }
}

/// Pause after an accept error that may go away (out of file descriptors or memory).
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Shortest reply write timeout [`ServerOptions::clamped`] allows.
const REPLY_WRITE_TIMEOUT_MIN: Duration = Duration::from_secs(1);
/// At most one "connection limit reached" warning per this many seconds.
const LIMIT_WARNING_INTERVAL_SECS: u64 = 10;
/// Capacity of the buffered reader of each connection.
const READ_BUFFER_BYTES: usize = 64 * 1024;

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// Serves the pool's refs over NBD on a TCP listener until accepting fails. Each connection
/// runs in its own task.
pub async fn serve_tcp(pool: Pool, listener: TcpListener) -> io::Result<()> {
    serve_tcp_with(
        Arc::new(PoolProvider::new(pool)),
        listener,
        ServerOptions::default(),
    )
    .await
}

/// Serves the pool's refs over NBD on a Unix socket listener until accepting fails.
pub async fn serve_unix(pool: Pool, listener: UnixListener) -> io::Result<()> {
    serve_unix_with(
        Arc::new(PoolProvider::new(pool)),
        listener,
        ServerOptions::default(),
    )
    .await
}

/// [`serve_tcp`] for any export provider, with explicit limits.
pub async fn serve_tcp_with<P: ExportProvider>(
    provider: Arc<P>,
    listener: TcpListener,
    options: ServerOptions,
) -> io::Result<()> {
    let options = Arc::new(options.clamped());
    let connections = Arc::new(Semaphore::new(options.connections_max));
    info!(address = ?listener.local_addr().ok(), "NBD server listening on TCP");
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop_requested(&options.stop) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                retry_accept(error).await?;
                continue;
            }
        };
        let Some(permit) = admit(&connections) else {
            continue;
        };
        // Replies are small and latency-bound; Nagle would hold them back.
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%error, "cannot set TCP_NODELAY");
        }
        let (reader, writer) = stream.into_split();
        let client = SessionClient {
            protocol: "nbd".to_string(),
            address: peer.to_string(),
        };
        tokio::spawn(run_connection(
            provider.clone(),
            reader,
            writer,
            client,
            options.clone(),
            permit,
        ));
    }
    drained(&connections, options.connections_max).await;
    info!("NBD listener stopped; its connections are closed");
    Ok(())
}

/// [`serve_unix`] for any export provider, with explicit limits.
pub async fn serve_unix_with<P: ExportProvider>(
    provider: Arc<P>,
    listener: UnixListener,
    options: ServerOptions,
) -> io::Result<()> {
    let options = Arc::new(options.clamped());
    let connections = Arc::new(Semaphore::new(options.connections_max));
    info!(address = ?listener.local_addr().ok(), "NBD server listening on a Unix socket");
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop_requested(&options.stop) => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                retry_accept(error).await?;
                continue;
            }
        };
        let Some(permit) = admit(&connections) else {
            continue;
        };
        let address = match stream.peer_cred() {
            Ok(cred) => match cred.pid() {
                Some(pid) => format!("unix:pid={pid},uid={}", cred.uid()),
                None => format!("unix:uid={}", cred.uid()),
            },
            Err(_) => "unix".to_string(),
        };
        let (reader, writer) = stream.into_split();
        let client = SessionClient {
            protocol: "nbd".to_string(),
            address,
        };
        tokio::spawn(run_connection(
            provider.clone(),
            reader,
            writer,
            client,
            options.clone(),
            permit,
        ));
    }
    drained(&connections, options.connections_max).await;
    info!("NBD listener stopped; its connections are closed");
    Ok(())
}

/// Serves one connection already accepted: handshake, then transmission, until the client
/// leaves or fails. `Ok` for a clean end (`NBD_OPT_ABORT`, `NBD_CMD_DISC`, or end of stream
/// between requests).
pub async fn serve_connection<P, R, W>(
    provider: Arc<P>,
    reader: R,
    mut writer: W,
    client: SessionClient,
    options: Arc<ServerOptions>,
) -> Result<(), Error>
where
    P: ExportProvider,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // The transmission phase relies on the ranges `clamped` enforces (a byte budget of at
    // least one maximum payload, or a request could wait for budget forever).
    let options = options.as_ref().clone().clamped();
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let negotiation = handshake::negotiate(&*provider, &mut reader, &mut writer, &client, &options);
    let negotiated = tokio::select! {
        // A client still negotiating has nothing in flight: it is simply closed.
        _ = stop_requested(&options.stop) => return Ok(()),
        negotiated = tokio::time::timeout(options.handshake_timeout, negotiation) => negotiated,
    };
    let negotiated = match negotiated {
        Ok(result) => result?,
        Err(_) => return Err(Error::HandshakeTimeout(options.handshake_timeout)),
    };
    let Some(negotiated) = negotiated else {
        debug!("client aborted the handshake");
        return Ok(());
    };
    info!(
        export = %negotiated.export_name,
        size_bytes = negotiated.size_bytes,
        read_only = negotiated.read_only,
        mode = ?negotiated.mode,
        contexts = negotiated.contexts.as_ref().map_or(0, |selection| selection.count()),
        flags = format_args!("{:#06x}", negotiated.transmission_flags),
        "transmission started"
    );
    transmission::serve(negotiated, &mut reader, writer, &options).await
}

async fn run_connection<P, R, W>(
    provider: Arc<P>,
    reader: R,
    writer: W,
    client: SessionClient,
    options: Arc<ServerOptions>,
    _permit: OwnedSemaphorePermit,
) where
    P: ExportProvider,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let id = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("nbd_connection", id, peer = %client.address);
    async move {
        debug!("connection accepted");
        match serve_connection(provider, reader, writer, client, options).await {
            Ok(()) => info!("connection closed"),
            Err(error) => info!(%error, "connection closed"),
        }
    }
    .instrument(span)
    .await
}

/// Takes a connection slot, or refuses the connection (by dropping it) at the limit.
fn admit(connections: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    static LAST_WARNING_SECS: AtomicU64 = AtomicU64::new(0);
    match connections.clone().try_acquire_owned() {
        Ok(permit) => Some(permit),
        Err(_) => {
            // A flood of connections must not become a flood of log lines.
            let now_secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs());
            let last_secs = LAST_WARNING_SECS.load(Ordering::Relaxed);
            if now_secs >= last_secs + LIMIT_WARNING_INTERVAL_SECS
                && LAST_WARNING_SECS
                    .compare_exchange(last_secs, now_secs, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                warn!("connection limit reached; closing new connections");
            } else {
                debug!("connection limit reached; closing a new connection");
            }
            None
        }
    }
}

/// Returns after a pause for accept errors that concern one connection or may pass; returns
/// the error otherwise, which stops the listener.
async fn retry_accept(error: io::Error) -> io::Result<()> {
    let transient = matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::OutOfMemory
    ) || matches!(
        error.raw_os_error(),
        Some(
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO | libc::EPERM
        )
    );
    if !transient {
        return Err(error);
    }
    warn!(%error, "accept failed; retrying");
    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
    Ok(())
}
