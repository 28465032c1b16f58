//! End-to-end crash consistency at process level: a raw NBD client writes numbered 4 KiB
//! blocks and flushes now and then while grove is killed with SIGKILL at a random moment
//! (seeded), again and again. After each restart every block holds what the last completed
//! flush covered, or one of the writes sent after it (never a torn or foreign block); every
//! commit made before a kill reads back exactly; `grove fsck` finds the pool clean at the end.
//!
//! GROVE_CRASH_ROUNDS=N runs N kill rounds (default 8); GROVE_CRASH_SEED=S picks the seed.

mod support;

use std::process::Command;
use std::thread;
use std::time::Duration;

use support::{grove_bin, nbd, run, Grove, Rng};

const BLOCKS: u64 = 1024;
const BLOCK: u64 = 4096;

fn block_bytes(token: u64) -> Vec<u8> {
    token.to_le_bytes().repeat((BLOCK / 8) as usize)
}

/// The token a block holds (0: never written); panics on a torn or foreign block.
fn token_of(bytes: &[u8], block: u64, context: &str) -> u64 {
    let token = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    assert!(
        bytes == block_bytes(token).as_slice(),
        "{context}: block {block} is torn or holds foreign data"
    );
    token
}

fn read_all(port: u16, export: &str, context: &str) -> Vec<u64> {
    let (mut conn, _) = nbd::open(port, export);
    let mut tokens = Vec::new();
    for chunk in 0..BLOCKS / 64 {
        let data = conn
            .read(chunk * 64 * BLOCK, (64 * BLOCK) as u32)
            .expect("read")
            .unwrap_or_else(|e| panic!("{context}: read failed with NBD error {e}"));
        for (i, bytes) in data.chunks(BLOCK as usize).enumerate() {
            tokens.push(token_of(bytes, chunk * 64 + i as u64, context));
        }
    }
    conn.disconnect();
    tokens
}

#[test]
fn acknowledged_flushed_writes_survive_sigkill() {
    let rounds: u64 = std::env::var("GROVE_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("GROVE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(42);
    let mut rng = Rng::new(seed);
    let mut grove = Grove::start();
    grove.create_volume("c", &format!("{}", BLOCKS * BLOCK));
    // What the last completed flush covered, and every write sent since, per block.
    let mut durable = vec![0u64; BLOCKS as usize];
    let mut since_flush: Vec<Vec<u64>> = vec![Vec::new(); BLOCKS as usize];
    let mut commits: Vec<(String, Vec<u64>)> = Vec::new();
    let mut next_token = 1u64;

    for round in 0..rounds {
        let context = format!("seed {seed} round {round}");
        // Sometimes commit first: a commit is a sync point and must survive exactly.
        if round % 3 == 1 {
            let id = grove.commit("c", &format!("round {round}"));
            for (block, writes) in since_flush.iter_mut().enumerate() {
                if let Some(&last) = writes.last() {
                    durable[block] = last;
                }
                writes.clear();
            }
            commits.push((id, durable.clone()));
        }
        let (mut conn, _) = nbd::open(grove.nbd_port, "c");
        let pid = grove.pid();
        let delay = Duration::from_millis(20 + rng.below(150));
        let killer = thread::spawn(move || {
            thread::sleep(delay);
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        });
        let mut ops = 0u64;
        loop {
            ops += 1;
            if ops.is_multiple_of(16) {
                match conn.flush() {
                    Ok(0) => {
                        for (block, writes) in since_flush.iter_mut().enumerate() {
                            if let Some(&last) = writes.last() {
                                durable[block] = last;
                            }
                            writes.clear();
                        }
                    }
                    Ok(error) => panic!("{context}: flush failed with NBD error {error}"),
                    Err(_) => break,
                }
                continue;
            }
            let block = rng.below(BLOCKS);
            let token = next_token;
            next_token += 1;
            // Counted before it is sent: a write in flight at the kill may or may not land.
            since_flush[block as usize].push(token);
            match conn.write(block * BLOCK, &block_bytes(token), 0) {
                Ok(0) => {}
                Ok(error) => panic!("{context}: write failed with NBD error {error}"),
                Err(_) => break,
            }
        }
        killer.join().expect("killer");
        eprintln!("{context}: killed after {ops} requests");
        grove.restart_after_kill9();

        let found = read_all(grove.nbd_port, "c", &context);
        for (block, &token) in found.iter().enumerate() {
            assert!(
                token == durable[block] || since_flush[block].contains(&token),
                "{context}: block {block} reads as write {token}; the last flush covered {}, sent since: {:?}",
                durable[block],
                since_flush[block]
            );
        }
        // What the restart kept is now the durable state.
        for (block, &token) in found.iter().enumerate() {
            durable[block] = token;
            since_flush[block].clear();
        }
        for (id, image) in &commits {
            let read = read_all(grove.nbd_port, &format!("c@{id}"), &context);
            assert!(&read == image, "{context}: commit {id} changed");
        }
    }

    // The pool is clean once stopped.
    let status = grove.terminate();
    assert!(status.success(), "grove exited with {status}");
    let out = run(
        Command::new(grove_bin())
            .arg("fsck")
            .arg("--data-dir")
            .arg(&grove.data_dir),
        Duration::from_secs(120),
    );
    out.assert_success();
    assert!(out.stdout.contains("clean"), "{}", out.report());
}
