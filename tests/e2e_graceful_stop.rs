//! End-to-end: a graceful stop. SIGTERM while an NBD client has a queue of writes in flight
//! and an iSCSI client is writing: grove stops reading requests, answers those it read,
//! flushes, closes the sessions and exits 0; after a restart every write it acknowledged is
//! there, and every other block holds its old or its new data.

mod support;

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use support::nbd::{self, CMD_WRITE, REQUEST_MAGIC};
use support::{require_nbd_tools, require_tool, Grove};

/// Enough writes that the stream is still going when the stop comes, 300 ms in: at 40,000
/// writes a second it would last well over a second.
const BLOCKS: u64 = 65536;
const BLOCK: u64 = 4096;

fn block_bytes(token: u64) -> Vec<u8> {
    token.to_le_bytes().repeat((BLOCK / 8) as usize)
}

#[test]
fn sigterm_answers_what_was_read_flushes_and_exits_zero() {
    require_nbd_tools();
    require_tool("iscsi-inq", "libiscsi-bin");
    let mut grove = Grove::start();
    grove.create_volume("drain", "256MiB");
    grove.create_volume("other", "64MiB");

    // An iSCSI client writing all along (qemu's iSCSI driver, a long run of writes).
    let writes: Vec<String> = (0..4000)
        .map(|i| {
            format!(
                "-c=write -P 0x{:02x} {} 64k",
                i % 250 + 1,
                (i % 900) * 65536
            )
        })
        .collect();
    let mut iscsi_writer = Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(&writes)
        .arg(format!(
            "iscsi://127.0.0.1:{}/iqn.2026-11.io.grove:other/0",
            grove.iscsi_port
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu-io");

    // An NBD client pipelining numbered block writes, replies read by another thread.
    let (mut sender, _) = nbd::open(grove.nbd_port, "drain");
    let mut receiver = sender.try_clone();
    let sending = thread::spawn(move || {
        let mut sent = Vec::new();
        for block in 0..BLOCKS {
            let data = block_bytes(block + 1);
            match sender.send_request(
                REQUEST_MAGIC,
                0,
                CMD_WRITE,
                block * BLOCK,
                BLOCK as u32,
                &data,
            ) {
                Ok(handle) => sent.push((handle, block)),
                Err(_) => break,
            }
        }
        sent
    });
    let receiving = thread::spawn(move || {
        let mut acknowledged = Vec::new();
        while let Ok((error, handle)) = receiver.any_simple_reply() {
            assert_eq!(error, 0, "write {handle} failed");
            acknowledged.push(handle);
        }
        acknowledged
    });

    // Stop while both are busy.
    thread::sleep(Duration::from_millis(300));
    let stopping = Instant::now();
    let status = grove.terminate();
    assert!(
        status.success(),
        "grove serve exited with {status:?}\n{}",
        grove.log_text()
    );
    let stop_time = stopping.elapsed();
    let sent = sending.join().expect("sender");
    let acknowledged = receiving.join().expect("receiver");
    let _ = iscsi_writer.kill();
    let _ = iscsi_writer.wait();
    let log = grove.log_text();
    assert!(
        log.contains("NBD and iSCSI sessions drained and closed"),
        "no drain in the log:\n{log}"
    );
    assert!(
        !acknowledged.is_empty() && (acknowledged.len() as u64) < BLOCKS,
        "the stop should come mid-stream: {} of {BLOCKS} writes acknowledged",
        acknowledged.len()
    );
    eprintln!(
        "stopped in {stop_time:?}: {} writes sent, {} acknowledged",
        sent.len(),
        acknowledged.len()
    );

    // Everything acknowledged is there; nothing is torn.
    grove.spawn();
    let block_of = |handle: u64| {
        sent.iter()
            .find(|(h, _)| *h == handle)
            .map(|(_, block)| *block)
            .expect("an acknowledged handle was sent")
    };
    let acknowledged_blocks: std::collections::HashSet<u64> =
        acknowledged.iter().map(|&h| block_of(h)).collect();
    let (mut conn, _) = nbd::open(grove.nbd_port, "drain");
    for chunk in 0..BLOCKS / 64 {
        let data = conn
            .read(chunk * 64 * BLOCK, (64 * BLOCK) as u32)
            .expect("read")
            .expect("read succeeds");
        for (i, bytes) in data.chunks(BLOCK as usize).enumerate() {
            let block = chunk * 64 + i as u64;
            let token = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
            assert!(
                bytes == block_bytes(token).as_slice(),
                "block {block} is torn after the stop"
            );
            if acknowledged_blocks.contains(&block) {
                assert_eq!(token, block + 1, "acknowledged block {block} lost");
            } else {
                assert!(
                    token == 0 || token == block + 1,
                    "block {block} holds foreign data"
                );
            }
        }
    }
    conn.disconnect();
    grove.assert_healthy();
}
