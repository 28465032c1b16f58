//! NBD negotiation and transmission from arbitrary client bytes.
//!
//! The input is everything a client sends on one connection. It is written into one end of an
//! in-memory duplex stream and the write side is then closed; the server (`serve_connection`
//! over a `MemoryProvider`) reads the other end while its replies are drained and dropped. The
//! run must end once the input is exhausted, without a panic, a hang or unbounded memory.

#![no_main]

use std::sync::Arc;
use std::time::Duration;

use grove_engine::SessionClient;
use grove_nbd_server::{serve_connection, MemoryProvider, ServerOptions};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes the duplex stream buffers in each direction.
const DUPLEX_BYTES: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(run(data));
});

async fn run(data: &[u8]) {
    let provider = MemoryProvider::new();
    provider.add_export("disk", 1 << 20, false);
    provider.add_export("disk@snap", 1 << 20, true);
    provider.add_export("", 64 * 1024, false);
    let provider = Arc::new(provider);

    let mut options = ServerOptions::default();
    options.handshake_timeout = Duration::from_secs(2);
    options.handshake_options_max = 64;
    options.in_flight_requests_max = 8;
    options.reply_write_timeout = Duration::from_secs(2);

    let (client, server) = tokio::io::duplex(DUPLEX_BYTES);
    let (server_read, server_write) = tokio::io::split(server);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let client_id = SessionClient {
        protocol: "nbd".to_string(),
        address: "fuzz".to_string(),
    };
    let serve = serve_connection(
        provider,
        server_read,
        server_write,
        client_id,
        Arc::new(options),
    );
    let send = async move {
        // The server may close first (a refused handshake): the rest is never read.
        let _ = client_write.write_all(data).await;
        let _ = client_write.shutdown().await;
    };
    let drain = async move {
        let mut sink = vec![0u8; DUPLEX_BYTES];
        while let Ok(n) = client_read.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let (_, _, _) = tokio::join!(serve, send, drain);
}
