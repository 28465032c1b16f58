//! Commits checked before they are made (`Pool::prepare_commit`): the candidate reads as
//! `VOL@ID` while it is checked; a withdrawn one stops reading; the branch cannot be deleted
//! or committed again meanwhile. And protected branches take no commit but a merge's.

#![allow(clippy::unwrap_used)]

use grove_engine::io::sim::SimDisk;
use grove_engine::*;

fn client() -> SessionClient {
    SessionClient {
        protocol: "test".into(),
        address: "sim".into(),
    }
}

fn msg(m: &str) -> CommitRequest {
    CommitRequest {
        message: m.into(),
        ..Default::default()
    }
}

async fn pool_with_writes() -> (SimDisk, Pool) {
    let disk = SimDisk::new();
    let pool = Pool::open_with_backend(disk.backend(), 1 << 20, None).unwrap();
    pool.create_volume("v", 64 * BLOCK_SIZE).await.unwrap();
    pool.create_branch("v", "dev", None).await.unwrap();
    let s = pool.open_session("v@dev", client()).unwrap();
    s.write(0, &[2; 4096], false).await.unwrap();
    (disk, pool)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_candidate_stops_reading() {
    let (_disk, pool) = pool_with_writes().await;
    let candidate = pool.prepare_commit("v", "dev").await.unwrap();
    let reader = pool.open_session(&candidate.export(), client()).unwrap();
    assert!(reader.read_only());
    assert_eq!(reader.read(0, 4096).await.unwrap(), vec![2; 4096]);

    // Meanwhile the branch cannot be deleted, nor committed a second time.
    assert!(matches!(
        pool.delete_branch("v", "dev").await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        pool.commit("v", "dev", msg("again")).await,
        Err(Error::Conflict(_))
    ));

    drop(candidate);
    assert!(
        reader.read(0, 4096).await.is_err(),
        "a withdrawn candidate still reads"
    );
    let writer = pool.open_session("v@dev", client()).unwrap();
    writer.write(0, &[3; 4096], false).await.unwrap();
    assert!(reader.read(0, 4096).await.is_err());
    assert!(pool.log("v@dev", None).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_candidate_reads_as_its_commit() {
    let (_disk, pool) = pool_with_writes().await;
    let candidate = pool.prepare_commit("v", "dev").await.unwrap();
    let id = candidate.commit;
    let reader = pool.open_session(&candidate.export(), client()).unwrap();
    let info = candidate.commit(msg("approved")).await.unwrap();
    assert_eq!(info.id, id);
    let writer = pool.open_session("v@dev", client()).unwrap();
    writer.write(0, &[4; 4096], false).await.unwrap();
    // The session opened on the candidate reads the commit, not the moving head.
    assert_eq!(reader.read(0, 4096).await.unwrap(), vec![2; 4096]);
}

#[tokio::test]
async fn protected_branches_take_no_commit_and_no_uncommitted_protection() {
    let (_disk, pool) = pool_with_writes().await;
    assert!(matches!(
        pool.set_protected("v", "dev", true).await,
        Err(Error::Conflict(_))
    ));
    pool.commit("v", "dev", msg("dev work")).await.unwrap();
    pool.set_protected("v", "main", true).await.unwrap();
    assert!(matches!(
        pool.commit("v", "main", msg("direct")).await,
        Err(Error::Conflict(_))
    ));
    let report = pool
        .merge(
            "v",
            MergeRequest {
                from: "dev".into(),
                into: "main".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(report.outcome, MergeOutcome::FastForward);
    assert!(matches!(
        pool.delete_volume("v").await,
        Err(Error::Conflict(_))
    ));
}
