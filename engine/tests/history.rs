//! Blame, space reclamation and refusals of the history operations.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::wait_until;

use grove_engine::io::sim::SimDisk;
use grove_engine::*;

const MIB: u64 = 1 << 20;

fn client() -> SessionClient {
    SessionClient {
        protocol: "test".into(),
        address: "sim".into(),
    }
}

fn msg(m: &str) -> CommitRequest {
    CommitRequest {
        message: m.into(),
        author: Some("tester".into()),
        ..Default::default()
    }
}

async fn write_blocks(pool: &Pool, export: &str, first: u64, n: u64, byte: u8) {
    let session = pool.open_session(export, client()).unwrap();
    session
        .write(
            first * BLOCK_SIZE,
            &vec![byte; (n * BLOCK_SIZE) as usize],
            false,
        )
        .await
        .unwrap();
}

fn sim_pool() -> (SimDisk, Pool) {
    let disk = SimDisk::new();
    let pool = Pool::open_with_backend(disk.backend(), 4 * MIB, None).unwrap();
    (disk, pool)
}

/// Merges branch x into main of volume v, with the default strategy.
async fn merge_x_into_main(pool: &Pool) -> MergeReport {
    let request = MergeRequest {
        from: "x".into(),
        into: "main".into(),
        ..Default::default()
    };
    pool.merge("v", request).await.unwrap()
}

#[tokio::test]
async fn blame_follows_merges_to_the_commit_that_wrote_a_block() {
    let (_disk, pool) = sim_pool();
    pool.create_volume("v", 16 * BLOCK_SIZE).await.unwrap();
    write_blocks(&pool, "v", 0, 4, 1).await;
    let c1 = pool.commit("v", "main", msg("first")).await.unwrap();
    write_blocks(&pool, "v", 2, 4, 2).await;
    let c2 = pool.commit("v", "main", msg("second")).await.unwrap();
    pool.create_branch("v", "x", Some(&c1.id.to_hex()))
        .await
        .unwrap();
    write_blocks(&pool, "v@x", 8, 1, 3).await;
    let x1 = pool.commit("v", "x", msg("on x")).await.unwrap();
    let report = merge_x_into_main(&pool).await;
    assert_eq!(report.outcome, MergeOutcome::Merged);
    write_blocks(&pool, "v", 9, 1, 4).await;

    let blame = pool.blame("v", 0, 12 * BLOCK_SIZE).await.unwrap();
    let got: Vec<(u64, u64, String)> = blame
        .iter()
        .map(|r| {
            let who = match &r.source {
                BlameSource::Committed { commit } => commit.message.clone(),
                BlameSource::Uncommitted => "uncommitted".into(),
                BlameSource::NeverWritten => "never".into(),
            };
            (r.offset_bytes / BLOCK_SIZE, r.len_bytes / BLOCK_SIZE, who)
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0, 2, "first".into()),
            (2, 4, "second".into()),
            (6, 2, "never".into()),
            (8, 1, "on x".into()),
            (9, 1, "uncommitted".into()),
            (10, 2, "never".into()),
        ]
    );
    // Unaligned byte ranges are clipped to what was asked.
    let part = pool
        .blame(&format!("v@{}", c2.id), 8092, 5000)
        .await
        .unwrap();
    assert_eq!(part.len(), 2);
    assert_eq!((part[0].offset_bytes, part[0].len_bytes), (8092, 100));
    assert_eq!((part[1].offset_bytes, part[1].len_bytes), (8192, 4900));
    assert!(matches!(&part[0].source, BlameSource::Committed { commit } if commit.id == c1.id));
    assert!(matches!(&part[1].source, BlameSource::Committed { commit } if commit.id == c2.id));
    let _ = x1;
    assert!(matches!(
        pool.blame("v", 0, 17 * BLOCK_SIZE).await,
        Err(Error::OutOfRange { .. })
    ));
}

#[tokio::test]
async fn squashing_the_first_commit_under_a_merge_keeps_the_merge_bitmap_exact() {
    let (_disk, pool) = sim_pool();
    pool.create_volume("v", 16 * BLOCK_SIZE).await.unwrap();
    // Two unrelated histories: e on main, t then c on x.
    pool.create_branch("v", "x", Some("main")).await.unwrap();
    write_blocks(&pool, "v", 0, 1, 1).await;
    let e = pool.commit("v", "main", msg("e")).await.unwrap();
    write_blocks(&pool, "v@x", 1, 2, 2).await;
    let t = pool.commit("v", "x", msg("t")).await.unwrap();
    let session = pool.open_session("v@x", client()).unwrap();
    session.trim(BLOCK_SIZE, BLOCK_SIZE, false).await.unwrap();
    drop(session);
    write_blocks(&pool, "v@x", 2, 1, 3).await;
    let c = pool.commit("v", "x", msg("c")).await.unwrap();
    let report = merge_x_into_main(&pool).await;
    let m = report.commit.unwrap();
    assert_eq!(m.parents, vec![e.id, c.id]);
    pool.delete_branch("v", "x").await.unwrap();
    pool.delete_commit("v", &c.id.to_hex()).await.unwrap();
    // e began its history: the merge's next parent, t, becomes its first. Block 1 (t's data,
    // the merge's zeros) changed from t though neither e nor the merge itself changed it.
    pool.delete_commit("v", &e.id.to_hex()).await.unwrap();
    let m = pool.commit_info("v", &m.id.to_hex()).unwrap();
    assert_eq!(m.parents, vec![t.id]);
    let changes: Vec<u64> = pool
        .commit_changes("v", &m.id.to_hex())
        .unwrap()
        .iter()
        .collect();
    assert_eq!(changes, vec![0, 1, 2]);
    let diff = pool
        .diff("v", &t.id.to_hex(), &m.id.to_hex())
        .await
        .unwrap();
    assert_eq!(diff.blocks.iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    pool.flush().await.unwrap();
    let report = pool.check_consistency().unwrap();
    assert!(report.clean(), "{:?}", report.problems);
}

#[tokio::test]
async fn squashing_a_commit_returns_its_own_blocks() {
    let (_disk, pool) = sim_pool();
    pool.create_volume("v", 4096 * BLOCK_SIZE).await.unwrap();
    write_blocks(&pool, "v", 0, 1000, 1).await;
    let c1 = pool.commit("v", "main", msg("one")).await.unwrap();
    write_blocks(&pool, "v", 0, 1000, 2).await;
    let c2 = pool.commit("v", "main", msg("two")).await.unwrap();
    write_blocks(&pool, "v", 2000, 10, 3).await;
    let c3 = pool.commit("v", "main", msg("three")).await.unwrap();

    let report = pool.reclaim().await.unwrap();
    let space = &report.volumes["v"];
    // c1's blocks were all overwritten: deleting it frees them (and its nodes and bitmap).
    assert!(space.commits[&c1.id] >= 1000 * BLOCK_SIZE, "{space:?}");
    assert!(space.commits[&c1.id] < 1100 * BLOCK_SIZE, "{space:?}");
    // c2 shares its blocks with c3 and the head.
    assert!(space.commits[&c2.id] < 50 * BLOCK_SIZE, "{space:?}");
    let used = pool.stats().unwrap().used_bytes;
    assert!(used >= 2010 * BLOCK_SIZE);

    pool.create_tag("v", "keep", &c1.id.to_hex()).await.unwrap();
    assert!(matches!(
        pool.delete_commit("v", &c1.id.to_hex()).await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        pool.delete_commit("v", &c3.id.to_hex()).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(
        pool.stats().unwrap().used_bytes,
        used,
        "refusals change nothing"
    );
    pool.delete_tag("v", "keep").await.unwrap();
    {
        let _reader = pool
            .open_session(&format!("v@{}", c1.id), client())
            .unwrap();
        assert!(matches!(
            pool.delete_commit("v", &c1.id.to_hex()).await,
            Err(Error::Conflict(_))
        ));
    }
    pool.delete_commit("v", &c1.id.to_hex()).await.unwrap();
    let report = pool.reclaim().await.unwrap();
    assert!(report.reclaimed_bytes >= 1000 * BLOCK_SIZE, "{report:?}");
    assert_eq!(pool.stats().unwrap().used_bytes, used - 1000 * BLOCK_SIZE);

    // c2 took c1's changes and parents; history and content are intact.
    let c2 = pool.commit_info("v", &c2.id.to_hex()).unwrap();
    assert!(c2.parents.is_empty());
    assert_eq!(c2.changed_blocks, 1000);
    assert_eq!(pool.log("v", None).unwrap().len(), 2);
    let session = pool
        .open_session(&format!("v@{}", c2.id), client())
        .unwrap();
    assert_eq!(session.read(0, BLOCK_SIZE).await.unwrap(), vec![2; 4096]);
    let diff = pool
        .diff("v", &c2.id.to_hex(), &c3.id.to_hex())
        .await
        .unwrap();
    assert_eq!(
        diff.byte_ranges(),
        vec![(2000 * BLOCK_SIZE, 10 * BLOCK_SIZE)]
    );
}

#[tokio::test]
async fn reset_clone_and_deletes_return_space() {
    let (disk, pool) = sim_pool();
    pool.create_volume("v", 4096 * BLOCK_SIZE).await.unwrap();
    write_blocks(&pool, "v", 0, 100, 1).await;
    let base = pool.commit("v", "main", msg("base")).await.unwrap();
    pool.flush().await.unwrap();
    let used_base = pool.stats().unwrap().used_bytes;

    // Uncommitted writes thrown away by a reset go back.
    write_blocks(&pool, "v", 200, 500, 2).await;
    assert!(matches!(
        pool.reset_branch("v", "main", &base.id.to_hex(), false)
            .await,
        Err(Error::Conflict(_))
    ));
    {
        let _attached = pool.open_session("v", client()).unwrap();
        assert!(matches!(
            pool.reset_branch("v", "main", &base.id.to_hex(), true)
                .await,
            Err(Error::Conflict(_))
        ));
    }
    let info = pool
        .reset_branch("v", "main", &base.id.to_hex(), true)
        .await
        .unwrap();
    assert_eq!(info.uncommitted_blocks, 0);
    pool.flush().await.unwrap();
    assert_eq!(pool.stats().unwrap().used_bytes, used_base);

    // A clone shares everything; its own writes are its own; deleting it returns them.
    let clone = pool.clone_volume("v", "c").await.unwrap();
    assert_eq!(clone.origin.as_ref().unwrap().commit, Some(base.id));
    assert_eq!(pool.log("c", None).unwrap()[0].id, base.id);
    write_blocks(&pool, "c", 50, 300, 3).await;
    pool.commit("c", "main", msg("on the clone")).await.unwrap();
    let s = pool.open_session("v", client()).unwrap();
    assert_eq!(s.read(50 * BLOCK_SIZE, 4096).await.unwrap(), vec![1; 4096]);
    drop(s);
    let report = pool.reclaim().await.unwrap();
    assert_eq!(report.volumes["c"].referenced_bytes, 350 * BLOCK_SIZE);
    assert!(report.volumes["c"].exclusive_bytes >= 300 * BLOCK_SIZE);
    assert_eq!(report.volumes["v"].referenced_bytes, 100 * BLOCK_SIZE);
    assert_eq!(pool.volume("c").unwrap().written_bytes, 350 * BLOCK_SIZE);
    assert!(matches!(
        pool.delete_volume("v").await,
        Err(Error::Conflict(_))
    ));
    let diff = pool.diff("c", "c", "v").await.unwrap();
    assert_eq!(
        diff.byte_ranges(),
        vec![(50 * BLOCK_SIZE, 300 * BLOCK_SIZE)]
    );
    pool.create_volume("other", BLOCK_SIZE * 8).await.unwrap();
    assert!(matches!(
        pool.diff("v", "v", "other").await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        pool.merge(
            "v",
            MergeRequest {
                from: "other".into(),
                into: "main".into(),
                ..Default::default()
            }
        )
        .await,
        Err(Error::InvalidArgument(_)) | Err(Error::NotFound { .. })
    ));
    pool.delete_volume("c").await.unwrap();
    pool.reclaim().await.unwrap();
    assert_eq!(pool.stats().unwrap().used_bytes, used_base);

    // A branch deleted returns its writes; a fresh open agrees on what is used.
    pool.create_branch("v", "tmp", None).await.unwrap();
    write_blocks(&pool, "v@tmp", 1000, 64, 5).await;
    pool.delete_branch("v", "tmp").await.unwrap();
    pool.reclaim().await.unwrap();
    let stats = pool.stats().unwrap();
    assert_eq!(stats.used_bytes, used_base);
    drop(pool);
    let pool = Pool::open_with_backend(disk.backend(), 4 * MIB, None).unwrap();
    let reopened = pool.stats().unwrap();
    assert_eq!(reopened.used_bytes, stats.used_bytes);
    assert_eq!(reopened.metadata_bytes, stats.metadata_bytes);
}

/// Scans run while writers, commits and branch deletes go on: nothing live is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scans_beside_io_free_nothing_live() {
    let disk = SimDisk::new();
    let pool = Pool::open_with_backend(disk.backend(), 0, None).unwrap();
    pool.create_volume("v", 512 * BLOCK_SIZE).await.unwrap();
    for b in ["a", "b", "c"] {
        pool.create_branch("v", b, None).await.unwrap();
    }
    let scanner = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for _ in 0..30 {
                pool.reclaim().await.unwrap();
            }
        })
    };
    let mut writers = Vec::new();
    for (i, b) in ["a", "b", "c"].into_iter().enumerate() {
        let pool = pool.clone();
        writers.push(tokio::spawn(async move {
            let export = format!("v@{b}");
            let session = Arc::new(pool.open_session(&export, client()).unwrap());
            let mut image = vec![0u8; 512];
            for round in 0..200u64 {
                let block = (round * 37 + i as u64 * 11) % 500;
                let n = 1 + round % 12;
                let byte = (round % 250) as u8 + 1;
                session
                    .write(
                        block * BLOCK_SIZE,
                        &vec![byte; (n * BLOCK_SIZE) as usize],
                        false,
                    )
                    .await
                    .unwrap();
                for k in block..block + n {
                    image[k as usize] = byte;
                }
                if round % 25 == 0 {
                    pool.commit("v", b, msg("w")).await.unwrap();
                }
                if round % 60 == 0 {
                    let tmp = format!("{b}-tmp{round}");
                    pool.create_branch("v", &tmp, Some(b)).await.unwrap();
                    pool.delete_branch("v", &tmp).await.unwrap();
                }
            }
            (export, image)
        }));
    }
    let mut images = Vec::new();
    for w in writers {
        images.push(w.await.unwrap());
    }
    scanner.await.unwrap();
    pool.reclaim().await.unwrap();
    let check = |pool: Pool, images: Vec<(String, Vec<u8>)>| async move {
        for (export, image) in images {
            let session = pool.open_session(&export, client()).unwrap();
            let data = session.read(0, 512 * BLOCK_SIZE).await.unwrap();
            for (k, &byte) in image.iter().enumerate() {
                let block = &data[k * 4096..(k + 1) * 4096];
                assert!(block.iter().all(|&x| x == byte), "{export} block {k}");
            }
        }
    };
    check(pool.clone(), images.clone()).await;
    let stats = pool.stats().unwrap();
    drop(pool);
    let pool = Pool::open_with_backend(disk.backend(), 0, None).unwrap();
    assert_eq!(pool.stats().unwrap().used_bytes, stats.used_bytes);
    assert_eq!(pool.stats().unwrap().metadata_bytes, stats.metadata_bytes);
    check(pool, images).await;
}

#[tokio::test]
async fn a_clone_merges_back_and_then_is_needed() {
    let (_disk, pool) = sim_pool();
    pool.create_volume("v", 64 * BLOCK_SIZE).await.unwrap();
    write_blocks(&pool, "v", 0, 4, 1).await;
    pool.commit("v", "main", msg("base")).await.unwrap();
    pool.clone_volume("v", "c").await.unwrap();
    write_blocks(&pool, "c", 10, 2, 2).await;
    let on_clone = pool.commit("c", "main", msg("on the clone")).await.unwrap();
    let report = pool
        .merge(
            "v",
            MergeRequest {
                from: "c@main".into(),
                into: "main".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(report.outcome, MergeOutcome::FastForward);
    assert_eq!(
        pool.branch("v", "main").unwrap().head_commit,
        Some(on_clone.id)
    );
    let s = pool.open_session("v", client()).unwrap();
    assert_eq!(s.read(10 * BLOCK_SIZE, 4096).await.unwrap(), vec![2; 4096]);
    drop(s);
    // v's history now continues from c's commit: c cannot go.
    assert!(matches!(
        pool.delete_volume("c").await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(pool.log("v", None).unwrap().len(), 2);
}

#[tokio::test]
async fn the_background_reclaimer_scans_once_after_a_burst_and_not_after_a_scan_that_saw_it() {
    let (_disk, pool) = sim_pool();
    pool.create_volume("v", 1024 * BLOCK_SIZE).await.unwrap();
    // Each commit's ten blocks are its own: the next one overwrites them.
    let mut commits = Vec::new();
    for n in 0..10u8 {
        write_blocks(&pool, "v", 0, 10, n + 1).await;
        commits.push(
            pool.commit("v", "main", msg("ten blocks"))
                .await
                .unwrap()
                .id,
        );
    }
    let _reclaimer = pool.spawn_reclaimer();
    wait_until("the scan at start", || pool.space_scans() == 1).await;
    pool.flush().await.unwrap();
    let used = pool.stats().unwrap().used_bytes;

    // A burst of deletes, a little apart, then nothing: one scan after it returns their
    // blocks.
    for id in &commits[1..5] {
        pool.delete_commit("v", &id.to_hex()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    wait_until("a scan after the burst", || pool.space_scans() >= 2).await;
    let report = pool.space_report().unwrap();
    assert!(
        commits[1..5]
            .iter()
            .all(|id| !report.volumes["v"].commits.contains_key(id)),
        "{report:?}"
    );
    pool.flush().await.unwrap();
    assert!(
        pool.stats().unwrap().used_bytes <= used - 40 * BLOCK_SIZE,
        "the four commits' own blocks went back to the pool"
    );
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(pool.space_scans(), 2, "one scan after the burst");

    // Deletes followed at once by a scan through the API: that scan saw them, so the
    // reclaimer, once their burst is over, has nothing left to do.
    for id in &commits[5..8] {
        pool.delete_commit("v", &id.to_hex()).await.unwrap();
    }
    pool.reclaim().await.unwrap();
    let scans = pool.space_scans();
    pool.flush().await.unwrap();
    assert!(pool.stats().unwrap().used_bytes <= used - 70 * BLOCK_SIZE);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        pool.space_scans(),
        scans,
        "no scan after the one through the API"
    );
}
