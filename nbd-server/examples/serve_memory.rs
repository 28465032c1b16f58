//! Serves in-memory exports on a Unix socket, to try or measure the protocol layer without
//! storage: `cargo run --release -p grove-nbd-server --example serve_memory -- /tmp/nbd.sock`
//! then e.g. `nbdinfo --list 'nbd+unix:///?socket=/tmp/nbd.sock'`. Exports: `vol` (1 GiB,
//! writable) and `vol@ro` (1 GiB, read-only).

use std::sync::Arc;

use grove_nbd_server::{serve_unix_with, MemoryProvider, ServerOptions};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/grove-nbd-memory.sock".to_string());
    let _ = std::fs::remove_file(&path);
    let provider = Arc::new(MemoryProvider::new());
    provider.add_export("vol", 1 << 30, false);
    provider.add_export("vol@ro", 1 << 30, true);
    let listener = tokio::net::UnixListener::bind(&path)?;
    serve_unix_with(provider, listener, ServerOptions::default()).await
}
