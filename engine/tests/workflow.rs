//! The git-like workflow on the real file backends: write, commit, read old versions, branch,
//! restart.

#![allow(clippy::unwrap_used)]

use grove_engine::*;

fn client() -> SessionClient {
    SessionClient {
        protocol: "test".into(),
        address: "local".into(),
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8))
        .collect()
}

async fn workflow(io: IoChoice) {
    let dir = tempfile::tempdir().unwrap();
    let mut options = PoolOptions::new(dir.path());
    options.io = io;
    let pool = Pool::open(options.clone()).unwrap();
    pool.create_volume("vol", 64 << 20).await.unwrap();
    let a = pattern(1, 1 << 20);
    let b = pattern(100, 64 << 10);
    let c1 = {
        let s = pool.open_session("vol", client()).unwrap();
        s.write(0, &a, false).await.unwrap();
        assert_eq!(s.read(0, 1 << 20).await.unwrap(), a);
        drop(s);
        let c1 = pool
            .commit(
                "vol",
                "main",
                CommitRequest {
                    message: "first".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(c1.changed_blocks, 256);
        assert_eq!(
            pool.commit_changes("vol", &c1.id.to_hex()).unwrap(),
            (0..256u64).collect()
        );
        let s = pool.open_session("vol", client()).unwrap();
        // Unaligned overwrite inside the committed range.
        s.write(1000, &b, false).await.unwrap();
        s.flush().await.unwrap();
        let mut expect = a.clone();
        expect[1000..1000 + b.len()].copy_from_slice(&b);
        assert_eq!(s.read(0, 1 << 20).await.unwrap(), expect);
        c1
    };
    // The commit still reads the old data, by full id and by prefix, and refuses writes.
    let old = pool
        .open_session(&format!("vol@{}", c1.id), client())
        .unwrap();
    assert!(old.read_only());
    assert_eq!(old.read(0, 1 << 20).await.unwrap(), a);
    assert!(matches!(
        old.write(0, &[1; 4096], false).await,
        Err(Error::ReadOnly(_))
    ));
    drop(old);
    let prefix = &c1.id.to_hex()[..8];
    assert!(matches!(
        pool.resolve(&format!("vol@{prefix}")).unwrap(),
        ResolvedRef::Commit { .. }
    ));
    // A branch from the commit diverges without touching main.
    pool.create_branch("vol", "dev", Some(&format!("vol@{prefix}")))
        .await
        .unwrap();
    let dev = pool.open_session("vol@dev", client()).unwrap();
    assert_eq!(dev.read(0, 4096).await.unwrap(), a[..4096]);
    dev.write(0, &[0xee; 8192], true).await.unwrap();
    drop(dev);
    pool.create_tag("vol", "v1", &c1.id.to_hex()).await.unwrap();
    let log = pool.log("vol", None).unwrap();
    assert_eq!(log.len(), 1);
    let exports: Vec<String> = pool.exports().into_iter().map(|e| e.name).collect();
    assert!(
        exports.contains(&"vol".to_string())
            && exports.contains(&"vol@dev".to_string())
            && exports.contains(&"vol@v1".to_string())
    );
    drop(pool);

    // Everything is there after a reopen.
    let pool = Pool::open(options).unwrap();
    let main = pool.open_session("vol", client()).unwrap();
    let mut expect = a.clone();
    expect[1000..1000 + b.len()].copy_from_slice(&b);
    assert_eq!(main.read(0, 1 << 20).await.unwrap(), expect);
    let dev = pool.open_session("vol@dev", client()).unwrap();
    assert_eq!(dev.read(0, 8192).await.unwrap(), vec![0xee; 8192]);
    assert_eq!(dev.read(8192, 4096).await.unwrap(), a[8192..12288]);
    let tag = pool.open_session("vol@v1", client()).unwrap();
    assert_eq!(tag.read(0, 1 << 20).await.unwrap(), a);
    assert_eq!(pool.branch("vol", "main").unwrap().head_commit, Some(c1.id));
    assert_eq!(pool.branch("vol", "main").unwrap().uncommitted_blocks, 17);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_on_io_uring() {
    workflow(IoChoice::IoUring).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_on_threads() {
    workflow(IoChoice::Threads).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_reads_trim_and_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(PoolOptions::new(dir.path())).unwrap();
    pool.create_volume("v", 16 << 40).await.unwrap();
    let s = pool.open_session("v", client()).unwrap();
    assert_eq!(
        s.block_status(0, 1 << 20).unwrap(),
        vec![BlockStatus {
            len_bytes: 1 << 20,
            hole: true,
            zero: true
        }]
    );
    let far = (16u64 << 40) - (1 << 20);
    s.write(far, &[7; 1 << 20], false).await.unwrap();
    assert_eq!(s.read(far - 4096, 8192).await.unwrap()[4096..], [7; 4096]);
    let chunks = s.read_chunks(far - 8192, 16384).await.unwrap();
    assert_eq!(chunks[0], ReadChunk::Zero { len_bytes: 8192 });
    s.trim(far + 4096, 8192, false).await.unwrap();
    s.write_zeroes(far + 65536 + 100, 10000, ZeroMode::MayTrim, false)
        .await
        .unwrap();
    let data = s.read(far, 1 << 20).await.unwrap();
    assert!(data[4096..12288].iter().all(|&b| b == 0));
    assert!(data[65536 + 100..65536 + 10100].iter().all(|&b| b == 0));
    assert_eq!(data[65536 + 99], 7);
    assert_eq!(data[65536 + 10100], 7);
    let status = s.block_status(far, 3 * 4096).unwrap();
    assert_eq!(
        status[0],
        BlockStatus {
            len_bytes: 4096,
            hole: false,
            zero: false
        }
    );
    assert_eq!(
        status[1],
        BlockStatus {
            len_bytes: 8192,
            hole: true,
            zero: true
        }
    );
    // Space is returned: trimming everything frees the blocks after a flush.
    let used = pool.stats().unwrap().used_bytes;
    assert_eq!(used, 1 << 20);
    s.trim(far, 1 << 20, false).await.unwrap();
    s.flush().await.unwrap();
    assert_eq!(pool.stats().unwrap().used_bytes, 0);
    assert!(matches!(
        s.read((16 << 40) - 4096, 8192).await,
        Err(Error::OutOfRange { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_and_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(PoolOptions::new(dir.path())).unwrap();
    assert!(matches!(
        pool.create_volume("Bad_Name", 4096).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        pool.create_volume("v", 1000).await,
        Err(Error::InvalidArgument(_))
    ));
    pool.create_volume("v", 1 << 20).await.unwrap();
    assert!(matches!(
        pool.create_volume("v", 1 << 20).await,
        Err(Error::AlreadyExists { .. })
    ));
    assert!(matches!(
        pool.open_session("nope", client()),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        pool.open_session("v@nope", client()),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        pool.delete_branch("v", "main").await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(
        pool.create_tag("v", "t", "v").await,
        Err(Error::InvalidArgument(_))
    ));
    let s = pool.open_session("v", client()).unwrap();
    assert!(matches!(
        pool.delete_volume("v").await,
        Err(Error::Conflict(_))
    ));
    drop(s);
    pool.delete_volume("v").await.unwrap();
    assert!(pool.volumes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_opens_in_one_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(PoolOptions::new(dir.path())).unwrap();
    assert!(matches!(
        Pool::open(PoolOptions::new(dir.path())),
        Err(Error::Conflict(_))
    ));
    drop(pool);
    Pool::open(PoolOptions::new(dir.path())).unwrap();
}
