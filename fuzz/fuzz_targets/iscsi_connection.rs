//! A whole iSCSI connection from arbitrary initiator bytes after a valid login.
//!
//! The input follows a Login Request that takes the connection straight to full feature
//! phase (no digests) on a real pool in a temporary directory: SCSI commands, Data-Out,
//! task management, text, NOP and logout PDUs in any shape. The connection must end once the
//! input is exhausted and every command it took is answered, without a panic, a hang or
//! unbounded memory.

#![no_main]

use std::sync::OnceLock;

use grove_engine::{Pool, PoolOptions};
use grove_iscsi::pdu::{op, Digests, Pdu};
use grove_iscsi::TargetOptions;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One pool for every input (opening one per input would dominate the run).
fn pool(runtime: &tokio::runtime::Runtime) -> Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("grove-fuzz-iscsi-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let pool = Pool::open(PoolOptions::new(&dir)).expect("open a pool");
        runtime
            .block_on(pool.create_volume("vol", 8 << 20))
            .expect("create a volume");
        pool
    })
    .clone()
}

fn login() -> Vec<u8> {
    let mut pdu = Pdu::new(op::LOGIN);
    pdu.set_immediate();
    pdu.set_flags(0x80 | (1 << 2) | 3);
    pdu.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
    pdu.set_itt(1);
    pdu.data = bytes_of(
        "InitiatorName=iqn.2026-11.fuzz:i\0TargetName=iqn.2026-11.io.grove:vol\0\
         SessionType=Normal\0HeaderDigest=None\0DataDigest=None\0MaxBurstLength=16384\0\
         FirstBurstLength=8192\0InitialR2T=No\0ImmediateData=Yes\0",
    );
    let mut wire = pdu.encode_header(Digests::default());
    wire.extend_from_slice(&pdu.data);
    wire.extend_from_slice(&pdu.encode_trailer(Digests::default()));
    wire
}

fn bytes_of(text: &str) -> bytes::Bytes {
    bytes::Bytes::copy_from_slice(text.as_bytes())
}

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    let pool = pool(&runtime);
    runtime.block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let serve =
            grove_iscsi::serve_stream(pool, TargetOptions::default(), server, "fuzz".into());
        let mut input = login();
        input.extend_from_slice(data);
        let send = async move {
            let _ = client_write.write_all(&input).await;
            let _ = client_write.shutdown().await;
        };
        let drain = async move {
            let mut sink = vec![0u8; 64 * 1024];
            while matches!(client_read.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        tokio::join!(serve, send, drain);
    });
});
