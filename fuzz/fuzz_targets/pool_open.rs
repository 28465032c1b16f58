//! Opening a pool whose journal and metadata come from the input, on the in-memory simulation
//! backend: the whole recovery path (file headers, journal framing and replay, the allocator
//! rebuild that walks every extent map and bitmap), then the consistency check, history
//! queries and reads on what opened.
//!
//! A small pool is built once per process (a volume with commits, a branch, a tag and
//! uncommitted writes). Each input replaces its journal and patches its metadata:
//! - up to the first NUL byte: journal record payloads, one per line, which the harness frames
//!   with valid checksums (so the JSON, not the checksum, is what gets fuzzed);
//! - after it: metadata patches, each `page u8 | offset u16 LE | len u8 | bytes`; a patched
//!   node page gets a valid checksum again unless the page byte's high bit is set.
//!
//! An empty journal section keeps the pool's own journal. Run with `GROVE_FUZZ_SEED_OUT=FILE`
//! to write the pool's own records, in this layout, to FILE (the seed corpus entry).

#![no_main]

use std::sync::OnceLock;

use grove_engine::format::{encode_record, seal_page, NODE_MAGIC, PAGE_SIZE};
use grove_engine::io::sim::SimDisk;
use grove_engine::io::FileKind;
use grove_engine::{CommitRequest, Pool, SessionClient, BLOCK_SIZE};
use libfuzzer_sys::fuzz_target;

/// Metadata page cache of the pools opened (the engine's minimum is 64 pages).
const CACHE_BYTES: u64 = 1 << 20;
/// Patches applied per input.
const PATCHES_MAX: usize = 64;

struct Golden {
    data: Vec<u8>,
    meta: Vec<u8>,
    journal_header: Vec<u8>,
    /// The journal's records, framed, after the header.
    journal_records: Vec<u8>,
}

fn client() -> SessionClient {
    SessionClient {
        protocol: "fuzz".to_string(),
        address: "sim".to_string(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

fn golden() -> &'static Golden {
    static GOLDEN: OnceLock<Golden> = OnceLock::new();
    GOLDEN.get_or_init(|| {
        let disk = SimDisk::new();
        runtime().block_on(async {
            let pool = Pool::open_with_backend(disk.backend(), CACHE_BYTES, None).expect("create");
            let message = |m: &str| CommitRequest {
                message: m.to_string(),
                ..Default::default()
            };
            pool.create_volume("v", 256 * BLOCK_SIZE)
                .await
                .expect("volume");
            let main = pool.open_session("v", client()).expect("session");
            for i in 0..24u64 {
                main.write(i * 3 * BLOCK_SIZE, &[i as u8 + 1; 4096], false)
                    .await
                    .expect("write");
            }
            drop(main);
            pool.commit("v", "main", message("first"))
                .await
                .expect("commit");
            pool.create_branch("v", "dev", None).await.expect("branch");
            let dev = pool.open_session("v@dev", client()).expect("session");
            dev.write(5 * BLOCK_SIZE, &[9; 8192], false)
                .await
                .expect("write");
            dev.trim(30 * BLOCK_SIZE, 4 * BLOCK_SIZE, false)
                .await
                .expect("trim");
            drop(dev);
            pool.commit("v", "dev", message("second"))
                .await
                .expect("commit");
            pool.create_tag("v", "t1", "dev").await.expect("tag");
            let main = pool.open_session("v", client()).expect("session");
            main.write(100 * BLOCK_SIZE, &[7; 4096], false)
                .await
                .expect("write");
            drop(main);
            pool.flush().await.expect("flush");
        });
        let journal = disk.file_image(FileKind::Journal);
        let golden = Golden {
            data: disk.file_image(FileKind::Data),
            meta: disk.file_image(FileKind::Meta),
            journal_header: journal[..PAGE_SIZE].to_vec(),
            journal_records: journal[PAGE_SIZE..].to_vec(),
        };
        if let Some(path) = std::env::var_os("GROVE_FUZZ_SEED_OUT") {
            let (payloads, _) = grove_engine::format::decode_records(&golden.journal_records);
            let mut seed = Vec::new();
            for payload in payloads {
                seed.extend_from_slice(payload);
                seed.push(b'\n');
            }
            std::fs::write(path, seed).expect("write the seed");
        }
        golden
    })
}

fuzz_target!(|input: &[u8]| {
    let golden = golden();
    let (records, patches) = match input.iter().position(|&b| b == 0) {
        Some(at) => (&input[..at], &input[at + 1..]),
        None => (input, &[][..]),
    };
    let mut journal = golden.journal_header.clone();
    if records.is_empty() {
        journal.extend_from_slice(&golden.journal_records);
    } else {
        for payload in records.split(|&b| b == b'\n') {
            journal.extend_from_slice(&encode_record(payload));
        }
    }
    let mut meta = golden.meta.clone();
    apply_patches(&mut meta, patches);

    let disk = SimDisk::new();
    disk.corrupt(FileKind::Data, 0, &golden.data);
    disk.corrupt(FileKind::Meta, 0, &meta);
    disk.corrupt(FileKind::Journal, 0, &journal);
    runtime().block_on(async {
        let Ok(pool) = Pool::open_with_backend(disk.backend(), CACHE_BYTES, None) else {
            return;
        };
        let _ = pool.check_consistency();
        for volume in pool.volumes() {
            let _ = pool.log(&volume.name, Some(8));
            let _ = pool.diff(&volume.name, "t1", &volume.name).await;
        }
        for export in pool.exports().into_iter().take(4) {
            let Ok(session) = pool.open_session(&export.name, client()) else {
                continue;
            };
            let len_bytes = session.size_bytes().min(64 * BLOCK_SIZE);
            let _ = session.read(0, len_bytes).await;
            let _ = session.block_status(0, len_bytes);
        }
    });
});

/// Applies `page u8 | offset u16 LE | len u8 | bytes` patches to the metadata image.
fn apply_patches(meta: &mut [u8], mut patches: &[u8]) {
    let pages = meta.len() / PAGE_SIZE;
    if pages == 0 {
        return;
    }
    for _ in 0..PATCHES_MAX {
        let [page, lo, hi, len, rest @ ..] = patches else {
            return;
        };
        let len = usize::from(*len).min(rest.len());
        let (bytes, rest) = rest.split_at(len);
        patches = rest;
        let page_no = usize::from(page & 0x7f) % pages;
        let offset = usize::from(u16::from_le_bytes([*lo, *hi])) % PAGE_SIZE;
        let len = len.min(PAGE_SIZE - offset);
        let page_bytes = &mut meta[page_no * PAGE_SIZE..(page_no + 1) * PAGE_SIZE];
        page_bytes[offset..offset + len].copy_from_slice(&bytes[..len]);
        if page & 0x80 == 0 && page_bytes[..4] == NODE_MAGIC.to_le_bytes() {
            seal_page(page_bytes);
        }
    }
}
