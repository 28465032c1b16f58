//! grove's iSCSI target (RFC 7143) with SCSI block commands (SBC-3, SPC-4): every ref of every
//! volume is a target with one LUN, and every command turns into a call on an engine session,
//! as in the NBD server.

mod chap;
mod connection;
pub mod login;
pub mod names;
pub mod pdu;
mod portal;
pub mod scsi;
pub mod text;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use grove_engine::Pool;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

pub use login::{ChapConfig, LoginConfig};
pub use portal::TargetOptions;

/// Serves the pool's refs as iSCSI targets on a TCP listener until accepting fails. Each
/// connection runs in its own task.
pub async fn serve_tcp(
    pool: Pool,
    listener: TcpListener,
    options: TargetOptions,
) -> io::Result<()> {
    let connections_max = options.connections_max.max(1);
    let connections = Arc::new(Semaphore::new(connections_max));
    let stop = options.stop.clone();
    let portal = portal::Portal::new(pool, options);
    info!(address = ?listener.local_addr().ok(), "iSCSI target listening");
    loop {
        let accepted = tokio::select! {
            biased;
            _ = portal::stop_requested(&stop) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors or a connection reset before accept: wait and go on;
                // anything else ends the listener.
                if matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) || error.raw_os_error() == Some(24)
                    || error.raw_os_error() == Some(23)
                {
                    warn!(%error, "cannot accept an iSCSI connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                return Err(error);
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            warn!(%peer, "iSCSI connection limit reached; closing the new connection");
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%error, "cannot set TCP_NODELAY");
        }
        let local = match stream.local_addr() {
            Ok(local) => local,
            Err(_) => continue,
        };
        let portal = portal.clone();
        tokio::spawn(async move {
            connection::serve(portal, stream, peer.to_string(), local).await;
            drop(permit);
        });
    }
    // Every connection holds a permit until it has closed.
    let all = u32::try_from(connections_max).unwrap_or(u32::MAX);
    let _all = connections.acquire_many(all).await;
    info!("iSCSI target stopped; its sessions are closed");
    Ok(())
}

/// Serves one connection given as a byte stream (login, then its session) until the stream
/// ends, with the pool's refs as targets. For fuzzing and tests; servers use [`serve_tcp`].
#[doc(hidden)]
pub async fn serve_stream<S>(pool: Pool, options: TargetOptions, stream: S, peer: String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let portal = portal::Portal::new(pool, options);
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 3260));
    connection::serve(portal, stream, peer, local).await;
}
