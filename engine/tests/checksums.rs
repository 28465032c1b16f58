//! Block checksums: damaged data is an error and an event, never silent bad data; a scrub
//! finds it; volumes with checksums off read what the disk holds. (That unflushed in-place
//! writes never read as checksum errors after a power cut is checked by `crash_model.rs`.)

#![allow(clippy::unwrap_used)]

use grove_engine::io::sim::SimDisk;
use grove_engine::io::FileKind;
use grove_engine::*;

const BLOCK: usize = 4096;

fn client() -> SessionClient {
    SessionClient {
        protocol: "test".into(),
        address: "sim".into(),
    }
}

fn block(i: u64) -> Vec<u8> {
    (0..BLOCK).map(|b| (b as u64 * 7 + i * 131) as u8).collect()
}

/// Writes blocks 0..16 of volume `v` and flushes.
async fn pool_with_blocks(disk: &SimDisk, options: VolumeOptions) -> Pool {
    let pool = Pool::open_with_backend(disk.backend(), 1 << 20, None).unwrap();
    pool.create_volume_with("v", 1 << 20, options)
        .await
        .unwrap();
    let s = pool.open_session("v", client()).unwrap();
    for i in 0..16u64 {
        s.write(i * BLOCK as u64, &block(i), false).await.unwrap();
    }
    s.flush().await.unwrap();
    pool
}

/// Flips a byte of the data block holding `content`.
fn damage(disk: &SimDisk, content: &[u8]) {
    let image = disk.file_image(FileKind::Data);
    let at = image
        .chunks_exact(BLOCK)
        .position(|b| b == content)
        .expect("block on disk");
    disk.corrupt(
        FileKind::Data,
        (at * BLOCK + 100) as u64,
        &[content[100] ^ 0x40],
    );
}

fn is_checksum_error(result: Result<Vec<u8>>) -> bool {
    matches!(result, Err(Error::Corrupt { what, .. }) if what.contains("checksum"))
}

#[tokio::test]
async fn a_damaged_block_fails_its_reads_and_is_reported_once() {
    let disk = SimDisk::new();
    drop(pool_with_blocks(&disk, VolumeOptions::default()).await);
    damage(&disk, &block(5));
    let pool = Pool::open_with_backend(disk.backend(), 1 << 20, None).unwrap();
    let s = pool.open_session("v", client()).unwrap();
    assert_eq!(s.read(4 * 4096, 4096).await.unwrap(), block(4));
    assert!(is_checksum_error(s.read(5 * 4096, 4096).await));
    // Part of the block, and a read spanning it, fail too.
    assert!(is_checksum_error(s.read(5 * 4096 + 512, 512).await));
    assert!(is_checksum_error(s.read(3 * 4096, 4 * 4096).await));
    assert_eq!(pool.checksum_errors(), 3);
    pool.flush().await.unwrap();
    let events = pool
        .events(&EventQuery {
            types: vec!["data.corrupted".into()],
            limit: 10,
            ..Default::default()
        })
        .unwrap()
        .events;
    assert_eq!(events.len(), 1, "one event per bad block: {events:?}");
    match &events[0].event {
        Event::DataCorrupted {
            volume,
            export,
            offset_bytes,
            found_by,
            ..
        } => {
            assert_eq!((volume.as_str(), export.as_str()), ("v", "v"));
            assert_eq!(*offset_bytes, 5 * 4096);
            assert_eq!(found_by, "read");
        }
        other => panic!("unexpected event {other:?}"),
    }
    // Writing the block again repairs it.
    s.write(5 * 4096, &block(99), false).await.unwrap();
    assert_eq!(s.read(5 * 4096, 4096).await.unwrap(), block(99));
}

#[tokio::test]
async fn a_scrub_finds_damage_in_heads_and_commits_and_counts_shared_blocks_once() {
    let disk = SimDisk::new();
    let pool = pool_with_blocks(&disk, VolumeOptions::default()).await;
    let commit = pool
        .commit(
            "v",
            "main",
            CommitRequest {
                message: "c".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Block 2 moves on the head; the commit keeps the old one.
    let s = pool.open_session("v", client()).unwrap();
    s.write(2 * 4096, &block(77), false).await.unwrap();
    s.flush().await.unwrap();
    let clean = pool.scrub(Some(1 << 30)).await.unwrap();
    assert_eq!(clean.state, "completed");
    assert_eq!((clean.checked_blocks, clean.bad_blocks), (17, 0));

    damage(&disk, &block(2));
    damage(&disk, &block(9));
    let report = pool.scrub(Some(1 << 30)).await.unwrap();
    assert_eq!((report.checked_blocks, report.bad_blocks), (17, 2));
    let mut found: Vec<(String, u64)> = report
        .errors
        .iter()
        .map(|e| (e.export.clone(), e.offset_bytes))
        .collect();
    found.sort();
    // Block 9 is shared by the head and the commit: found once, through the head.
    let mut want = vec![
        ("v".to_string(), 9 * 4096),
        (format!("v@{}", commit.id), 2 * 4096),
    ];
    want.sort();
    assert_eq!(found, want);
    pool.flush().await.unwrap();
    let events = pool
        .events(&EventQuery {
            types: vec!["data.corrupted".into(), "scrub.completed".into()],
            limit: 10,
            ..Default::default()
        })
        .unwrap()
        .events;
    assert_eq!(events.len(), 4, "{events:?}");
    // A second scrub cannot start while one runs; a running one can be stopped.
    pool.start_scrub(Some(1)).unwrap();
    assert!(matches!(pool.start_scrub(None), Err(Error::Conflict(_))));
    pool.stop_scrub().unwrap();
    for _ in 0..100 {
        if pool.scrub_status().unwrap().state != "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(pool.scrub_status().unwrap().state, "stopped");
    pool.start_scrub(None).unwrap();
}

#[tokio::test]
async fn volumes_without_checksums_read_what_the_disk_holds() {
    let disk = SimDisk::new();
    drop(pool_with_blocks(&disk, VolumeOptions { checksums: false }).await);
    damage(&disk, &block(5));
    let pool = Pool::open_with_backend(disk.backend(), 1 << 20, None).unwrap();
    assert!(!pool.volume("v").unwrap().checksums);
    let s = pool.open_session("v", client()).unwrap();
    let got = s.read(5 * 4096, 4096).await.unwrap();
    assert_ne!(got, block(5));
    let report = pool.scrub(None).await.unwrap();
    assert_eq!((report.checked_blocks, report.unchecked_blocks), (0, 16));
}

#[tokio::test]
async fn in_place_writes_keep_checksums_right_across_a_clean_reopen() {
    let disk = SimDisk::new();
    let pool = pool_with_blocks(&disk, VolumeOptions::default()).await;
    let s = pool.open_session("v", client()).unwrap();
    // Blocks the head owns are overwritten in place, some partially.
    for i in 0..16u64 {
        s.write(i * 4096 + 1000, &[i as u8; 3000], false)
            .await
            .unwrap();
    }
    drop(s);
    pool.close().await.unwrap();
    drop(pool);
    let pool = Pool::open_with_backend(disk.backend(), 1 << 20, None).unwrap();
    let report = pool.scrub(None).await.unwrap();
    assert_eq!((report.checked_blocks, report.bad_blocks), (16, 0));
    let s = pool.open_session("v", client()).unwrap();
    for i in 0..16u64 {
        let mut want = block(i);
        want[1000..4000].fill(i as u8);
        assert_eq!(s.read(i * 4096, 4096).await.unwrap(), want);
    }
}
