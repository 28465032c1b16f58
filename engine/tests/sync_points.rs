//! The sync protocol at its edges: writes racing a flush, a commit whose caller goes away, and
//! metadata writes failing on a full disk.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::{pause_after_data_sync, wait_until, HookBackend, Hooks};
use grove_engine::io::sim::SimDisk;
use grove_engine::*;

fn client() -> SessionClient {
    SessionClient {
        protocol: "test".into(),
        address: "sim".into(),
    }
}

fn hooked(disk: &SimDisk) -> (Pool, Arc<Hooks>) {
    let hooks = Arc::new(Hooks::default());
    let backend = Arc::new(HookBackend {
        inner: disk.backend(),
        hooks: hooks.clone(),
    });
    (
        Pool::open_with_backend(backend, 1 << 20, None).unwrap(),
        hooks,
    )
}

async fn wait(rx: std::sync::mpsc::Receiver<()>) {
    tokio::task::spawn_blocking(move || rx.recv().unwrap())
        .await
        .unwrap();
}

/// A block freed by a deleted volume and reused by a write racing a flush must never read back
/// as the deleted volume's data after a power cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_racing_a_flush_never_exposes_freed_data() {
    for seed in 0..16 {
        let disk = SimDisk::new();
        let (pool, hooks) = hooked(&disk);
        pool.create_volume("secret", 1 << 20).await.unwrap();
        let s = pool.open_session("secret", client()).unwrap();
        s.write(0, &[0xaa; 4096], false).await.unwrap();
        drop(s);
        pool.flush().await.unwrap();
        pool.create_volume("v", 1 << 20).await.unwrap();
        pool.delete_volume("secret").await.unwrap();
        pool.flush().await.unwrap();

        let (reached, go) = pause_after_data_sync(&hooks);
        let flusher = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.flush().await })
        };
        wait(reached).await;
        let s = pool.open_session("v", client()).unwrap();
        s.write(5 * 4096, &[0xbb; 4096], false).await.unwrap();
        go.send(()).unwrap();
        flusher.await.unwrap().unwrap();
        drop(s);
        drop(pool);
        disk.crash(seed);
        let pool = Pool::open_with_backend(disk.backend(), 1 << 20, None).unwrap();
        let got = pool
            .open_session("v", client())
            .unwrap()
            .read(5 * 4096, 4096)
            .await
            .unwrap();
        let first = got[0];
        assert!(
            first == 0 || first == 0xbb,
            "seed {seed}: block 5 reads {first:#x}, data it never held"
        );
    }
}

/// A commit whose caller is cancelled still completes, publishes its event, and no write can
/// land in its blocks meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_commit_completes_and_stays_immutable() {
    let disk = SimDisk::new();
    let (pool, hooks) = hooked(&disk);
    pool.create_volume("v", 1 << 20).await.unwrap();
    let s = pool.open_session("v", client()).unwrap();
    s.write(0, &[1; 4096], false).await.unwrap();
    let mut events = pool.subscribe();

    let (reached, go) = pause_after_data_sync(&hooks);
    let commit = {
        let pool = pool.clone();
        tokio::spawn(async move {
            pool.commit(
                "v",
                "main",
                CommitRequest {
                    message: "c".into(),
                    ..Default::default()
                },
            )
            .await
        })
    };
    wait(reached).await;
    commit.abort();
    // A write issued now must wait for the commit and then go to a new block.
    let writer = {
        let s = s.clone();
        tokio::spawn(async move { s.write(0, &[2; 4096], false).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(
        !writer.is_finished(),
        "a write went through while the commit was being made"
    );
    go.send(()).unwrap();
    writer.await.unwrap().unwrap();

    let event = loop {
        match events.recv().await.unwrap().event.clone() {
            Event::CommitCreated { commit, .. } => break commit,
            _ => continue,
        }
    };
    let committed = pool.open_session(&format!("v@{event}"), client()).unwrap();
    assert_eq!(committed.read(0, 4096).await.unwrap(), vec![1; 4096]);
    assert_eq!(s.read(0, 4096).await.unwrap(), vec![2; 4096]);
}

/// When metadata can no longer be written, the pool fails and says so: flushes are refused,
/// everything acknowledged still reads back, and after a restart everything flushed is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_metadata_writes_fail_the_pool() {
    let disk = SimDisk::new();
    let hooks = Arc::new(Hooks::default());
    let backend = Arc::new(HookBackend {
        inner: disk.backend(),
        hooks: hooks.clone(),
    });
    // A small cache, so that writes evict dirty nodes.
    let pool = Pool::open_with_backend(backend, 64 * 4096, None).unwrap();
    pool.create_volume("v", 1 << 30).await.unwrap();
    let s = pool.open_session("v", client()).unwrap();
    let flushed = 6000u64;
    for i in 0..flushed {
        s.write(i * 8192, &[(i % 251) as u8 + 1; 4096], false)
            .await
            .unwrap();
    }
    pool.flush().await.unwrap();
    hooks.fail_meta_writes.store(true, Ordering::SeqCst);
    let mut acknowledged = flushed;
    for i in flushed..flushed + 6000 {
        match s.write(i * 8192, &[7; 4096], false).await {
            Ok(()) => acknowledged = i + 1,
            Err(_) => break,
        }
    }
    assert!(
        acknowledged < flushed + 6000,
        "no metadata write was attempted"
    );
    assert!(pool.is_failed());
    assert!(matches!(pool.flush().await, Err(Error::Poisoned)));
    assert!(matches!(
        s.write(0, &[9; 4096], false).await,
        Err(Error::Poisoned)
    ));
    for i in 0..acknowledged {
        let want = if i < flushed { (i % 251) as u8 + 1 } else { 7 };
        assert_eq!(
            s.read(i * 8192, 4096).await.unwrap(),
            vec![want; 4096],
            "block {}",
            i * 2
        );
    }
    drop(s);
    drop(pool);
    hooks.fail_meta_writes.store(false, Ordering::SeqCst);
    let pool = Pool::open_with_backend(disk.backend(), 1 << 20, None).unwrap();
    let s = pool.open_session("v", client()).unwrap();
    for i in 0..flushed {
        assert_eq!(
            s.read(i * 8192, 4096).await.unwrap(),
            vec![(i % 251) as u8 + 1; 4096]
        );
    }
}

/// A delete whose caller gives up once the change is under way (an HTTP client gone) still
/// completes, and still asks the background reclaimer for the scan that frees its blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_whose_caller_gave_up_still_gets_its_space_back() {
    let disk = SimDisk::new();
    let (pool, hooks) = hooked(&disk);
    pool.create_volume("v", 1 << 20).await.unwrap();
    // Each commit's ten blocks are its own: the next one overwrites them.
    let mut commits = Vec::new();
    for n in 0..3u8 {
        let s = pool.open_session("v", client()).unwrap();
        s.write(0, &vec![n + 1; 10 * 4096], false).await.unwrap();
        drop(s);
        let request = CommitRequest {
            message: "ten blocks".into(),
            ..Default::default()
        };
        commits.push(pool.commit("v", "main", request).await.unwrap().id);
    }
    let _reclaimer = pool.spawn_reclaimer();
    wait_until("the scan at start", || pool.space_scans() == 1).await;
    pool.flush().await.unwrap();
    let used = pool.stats().unwrap().used_bytes;

    let (reached, go) = pause_after_data_sync(&hooks);
    let doomed = commits[1].to_hex();
    {
        // Polled until its sync point is under way, then dropped, as an HTTP handler is when
        // its client goes away.
        let delete = pool.delete_commit("v", &doomed);
        tokio::pin!(delete);
        tokio::select! {
            _ = &mut delete => panic!("the delete finished while its sync point was held"),
            _ = wait(reached) => {}
        }
    }
    go.send(()).unwrap();
    wait_until("the commit's deletion", || {
        pool.log("v", None)
            .unwrap()
            .iter()
            .all(|c| c.id != commits[1])
    })
    .await;
    wait_until("a scan after it", || pool.space_scans() == 2).await;
    pool.flush().await.unwrap();
    assert!(pool.stats().unwrap().used_bytes <= used - 10 * 4096);
}
