//! A full pool (FORMAT.md, "Running out of space"), on a simulated disk with a capacity: writes
//! that need space fail with `NoSpace` before anything is written or mapped, nothing written
//! before is damaged, commits are made or refused cleanly, the pool never fails, and space
//! freed by trims and deletes (or on the disk) is used again after the next sync point.

#![allow(clippy::unwrap_used)]

use grove_engine::io::sim::SimDisk;
use grove_engine::io::FileKind;
use grove_engine::*;

const MIB: u64 = 1 << 20;

fn client() -> SessionClient {
    SessionClient {
        protocol: "test".into(),
        address: "sim".into(),
    }
}

fn open(disk: &SimDisk) -> Pool {
    Pool::open_with_backend(disk.backend(), 4 << 20, None).unwrap()
}

fn pattern(i: u64) -> u8 {
    (i % 251) as u8 + 1
}

fn assert_clean(pool: &Pool) {
    let report = pool.check_consistency().unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Writes `chunk`-byte pieces from `from` until the pool refuses one; returns how many went
/// through. The refusal must be `NoSpace`, and must leave the pool healthy.
async fn fill(s: &Session, from: u64, chunk: u64, limit: u64) -> u64 {
    for i in 0..limit {
        match s
            .write(from + i * chunk, &vec![pattern(i); chunk as usize], false)
            .await
        {
            Ok(()) => {}
            Err(Error::NoSpace) => return i,
            Err(err) => panic!("write {i} failed with {err} instead of NoSpace"),
        }
    }
    panic!("{limit} writes of {chunk} bytes fitted: the disk never filled");
}

async fn check_filled(s: &Session, from: u64, chunk: u64, count: u64) {
    for i in 0..count {
        assert_eq!(
            s.read(from + i * chunk, chunk).await.unwrap(),
            vec![pattern(i); chunk as usize],
            "piece {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_refuses_writes_cleanly_and_reuses_freed_space() {
    let disk = SimDisk::new();
    disk.set_capacity(Some(32 * MIB));
    let pool = open(&disk);
    pool.create_volume("v", 256 * MIB).await.unwrap();
    pool.create_volume("scratch", 256 * MIB).await.unwrap();
    let v = pool.open_session("v", client()).unwrap();
    v.write(0, &[0xaa; 1 << 20], false).await.unwrap();
    pool.commit(
        "v",
        "main",
        CommitRequest {
            message: "base".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    // Fill the disk from another volume.
    let scratch = pool.open_session("scratch", client()).unwrap();
    let chunk = 256 << 10;
    let written = fill(&scratch, 0, chunk, 1024).await;
    assert!(written > 40, "only {written} pieces fitted in 32 MiB");
    assert!(!pool.is_failed());
    assert!(
        disk.used_bytes() <= 32 * MIB,
        "the disk holds {} bytes",
        disk.used_bytes()
    );
    // Nothing acknowledged is damaged; a flush still makes it durable.
    check_filled(&scratch, 0, chunk, written).await;
    assert_eq!(v.read(0, 1 << 20).await.unwrap(), vec![0xaa; 1 << 20]);
    pool.flush().await.unwrap();
    // Blocks a head owns are overwritten in place: no new space needed.
    scratch.write(0, &[0x55; 4096], false).await.unwrap();
    assert_eq!(scratch.read(0, 4096).await.unwrap(), vec![0x55; 4096]);
    scratch.write(0, &[pattern(0); 4096], false).await.unwrap();
    // Writes to v that need new blocks are refused too, and leave v as it was.
    assert!(matches!(
        v.write(0, &vec![0xbb; chunk as usize], false).await,
        Err(Error::NoSpace)
    ));
    assert_eq!(v.read(0, 1 << 20).await.unwrap(), vec![0xaa; 1 << 20]);
    // A commit is made from the metadata reserve (or refused cleanly; never a failed pool).
    let made = pool
        .commit(
            "scratch",
            "main",
            CommitRequest {
                message: "full".into(),
                ..Default::default()
            },
        )
        .await;
    match &made {
        Ok(_) | Err(Error::NoSpace) => {}
        Err(err) => panic!("commit on a full pool: {err}"),
    }
    assert!(!pool.is_failed());
    // Branches and tags need only journal room.
    pool.create_branch("v", "b", None).await.unwrap();
    pool.create_tag("v", "t", "v@main").await.unwrap();
    pool.delete_branch("v", "b").await.unwrap();

    // Deleting the scratch volume (its blocks may be committed) frees them all at the next
    // sync point: v can write that much again.
    drop(scratch);
    pool.delete_volume("scratch").await.unwrap();
    pool.flush().await.unwrap();
    let refilled = fill(&v, 4 << 20, chunk, 1024).await;
    assert!(
        refilled + 8 >= written,
        "only {refilled} of {written} pieces fitted again after the delete"
    );
    check_filled(&v, 4 << 20, chunk, refilled).await;
    assert_eq!(v.read(0, 1 << 20).await.unwrap(), vec![0xaa; 1 << 20]);

    // A trim of uncommitted blocks frees them after the next flush, too.
    v.trim(4 << 20, 4 * chunk, false).await.unwrap();
    pool.flush().await.unwrap();
    for i in 0..4 {
        v.write(
            4 * MIB + i * chunk,
            &vec![pattern(i); chunk as usize],
            false,
        )
        .await
        .unwrap();
    }
    pool.flush().await.unwrap();
    check_filled(&v, 4 << 20, chunk, refilled).await;
    assert!(!pool.is_failed());
    assert_clean(&pool);

    // What was flushed survives a power cut and a reopen on the same full disk.
    drop(v);
    drop(pool);
    disk.crash(7);
    let pool = open(&disk);
    assert_clean(&pool);
    let v = pool.open_session("v", client()).unwrap();
    assert_eq!(v.read(0, 1 << 20).await.unwrap(), vec![0xaa; 1 << 20]);
    check_filled(&v, 4 << 20, chunk, refilled).await;
    // Still full; freeing space on the disk lets writes through again.
    assert!(matches!(
        v.write(200 * MIB, &[1; 1 << 20], false).await,
        Err(Error::NoSpace)
    ));
    disk.set_capacity(Some(64 * MIB));
    v.write(200 * MIB, &[1; 1 << 20], false).await.unwrap();
    pool.flush().await.unwrap();
    assert_clean(&pool);
}

/// With the disk full and the reserves used up, changes that need a journal record are
/// refused with `NoSpace` and change nothing; freeing space on the disk makes them work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_refused_cleanly_when_the_reserves_run_out() {
    let disk = SimDisk::new();
    let pool = open(&disk);
    pool.create_volume("v", 64 * MIB).await.unwrap();
    let v = pool.open_session("v", client()).unwrap();
    v.write(0, &[0xaa; 65536], false).await.unwrap();
    pool.flush().await.unwrap();
    // The disk is full now: only what was set aside is left.
    disk.set_capacity(Some(disk.used_bytes()));
    // Long messages use the journal's reserve up quickly.
    let message = "m".repeat(16 << 10);
    let mut made = 0u64;
    let refused = loop {
        v.write(made * 4096, &[pattern(made); 4096], false)
            .await
            .unwrap();
        match pool
            .commit(
                "v",
                "main",
                CommitRequest {
                    message: message.clone(),
                    ..Default::default()
                },
            )
            .await
        {
            Ok(_) => made += 1,
            Err(Error::NoSpace) => break made,
            Err(err) => panic!("commit {made} failed with {err}"),
        }
        assert!(made < 1000, "the journal reserve never ran out");
    };
    assert!(refused > 4, "only {refused} commits fitted in the reserve");
    assert!(!pool.is_failed());
    assert_eq!(pool.log("v", None).unwrap().len() as u64, made);
    // The refused commit left the branch as it was: its write is still uncommitted.
    assert_eq!(pool.branch("v", "main").unwrap().uncommitted_blocks, 1);
    // So is a flush with something to record; the data stays readable.
    assert!(matches!(pool.flush().await, Err(Error::NoSpace)));
    for i in 0..=made {
        assert_eq!(
            v.read(i * 4096, 4096).await.unwrap(),
            vec![pattern(i); 4096]
        );
    }
    assert!(!pool.is_failed());

    // Space freed on the disk: everything works again.
    disk.set_capacity(None);
    pool.flush().await.unwrap();
    pool.commit(
        "v",
        "main",
        CommitRequest {
            message: "after".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_clean(&pool);
    drop(v);
    drop(pool);
    disk.crash(3);
    let pool = open(&disk);
    assert_clean(&pool);
    assert_eq!(pool.log("v", None).unwrap().len() as u64, made + 1);
    let v = pool.open_session("v", client()).unwrap();
    for i in 0..=made {
        assert_eq!(
            v.read(i * 4096, 4096).await.unwrap(),
            vec![pattern(i); 4096]
        );
    }
}

/// On a file system without preallocation nothing is set aside: a data write that meets
/// ENOSPC still fails alone, with its blocks never mapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_preallocation_a_failed_data_write_fails_alone() {
    let disk = SimDisk::new();
    disk.set_allocate_supported(false);
    let pool = open(&disk);
    pool.create_volume("v", 64 * MIB).await.unwrap();
    let v = pool.open_session("v", client()).unwrap();
    v.write(0, &[0xaa; 65536], false).await.unwrap();
    pool.flush().await.unwrap();
    disk.set_capacity(Some(disk.used_bytes() + 4096));
    assert!(matches!(
        v.write(1 << 20, &[0xbb; 65536], false).await,
        Err(Error::NoSpace)
    ));
    assert!(!pool.is_failed());
    assert_eq!(v.read(0, 65536).await.unwrap(), vec![0xaa; 65536]);
    assert_eq!(v.read(1 << 20, 65536).await.unwrap(), vec![0; 65536]);
    disk.set_capacity(None);
    v.write(1 << 20, &[0xbb; 65536], false).await.unwrap();
    pool.flush().await.unwrap();
    assert_clean(&pool);
}

/// Large writes pass over small free runs for room past the end of the data file; on a full
/// disk, where that room cannot be had, they take the small runs after all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_full_disk_large_writes_use_the_small_free_runs() {
    let disk = SimDisk::new();
    disk.set_capacity(Some(32 * MIB));
    let pool = open(&disk);
    pool.create_volume("v", 256 * MIB).await.unwrap();
    let v = pool.open_session("v", client()).unwrap();
    let chunk = 64 << 10;
    let written = fill(&v, 0, chunk, 4096).await;
    assert!(written > 200, "only {written} pieces fitted in 32 MiB");
    // Free one block in each of 200 pieces: 200 runs of one block, none next to another.
    for i in 0..200 {
        v.trim(i * chunk, 4096, false).await.unwrap();
    }
    pool.flush().await.unwrap();
    let data = (0..(256 << 10))
        .map(|i| (i % 253) as u8)
        .collect::<Vec<u8>>();
    v.write(200 * MIB, &data, false).await.unwrap();
    assert_eq!(v.read(200 * MIB, data.len() as u64).await.unwrap(), data);
    // The next large write goes to the small runs at once: the data file could not grow.
    let refused = disk.data_allocations_refused();
    assert!(refused > 0);
    v.write(201 * MIB, &data, false).await.unwrap();
    assert_eq!(disk.data_allocations_refused(), refused);
    assert_eq!(v.read(201 * MIB, data.len() as u64).await.unwrap(), data);
    for i in 0..200 {
        assert_eq!(v.read(i * chunk, 4096).await.unwrap(), vec![0; 4096]);
    }
    pool.flush().await.unwrap();
    assert!(!pool.is_failed());
    assert_clean(&pool);
}

/// A block handed out always has its checksum page set aside: where the data file could grow
/// for a write but `sums.grove` could not, that write is refused, and so is the next one that
/// would take the same block, rather than taken with a checksum no sync point could write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_refused_when_its_checksum_page_has_no_room() {
    let disk = SimDisk::new();
    let pool = open(&disk);
    pool.create_volume("v", 64 * MIB).await.unwrap();
    let v = pool.open_session("v", client()).unwrap();
    // The data file's first block is its header: with 4 MiB less one block of data, the
    // next data block is the first of a new checksum page.
    v.write(0, &vec![0xaa; (4 << 20) - 4096], false)
        .await
        .unwrap();
    pool.flush().await.unwrap();
    assert_eq!(disk.file_len(FileKind::Data), 4 * MIB);
    // Room for one more data block, none for its checksum page.
    disk.set_capacity(Some(disk.used_bytes() + 4096));
    for attempt in 0..2 {
        assert!(
            matches!(
                v.write(4 * MIB, &[0xbb; 4096], false).await,
                Err(Error::NoSpace)
            ),
            "attempt {attempt}"
        );
    }
    // The data file did grow: only the checksum page was missing.
    assert_eq!(disk.file_len(FileKind::Data), 4 * MIB + 4096);
    // Writes over blocks the volume owns need no room.
    v.write(0, &[0xcc; 4096], false).await.unwrap();
    pool.flush().await.unwrap();
    assert!(!pool.is_failed());
    assert_eq!(v.read(4 * MIB, 4096).await.unwrap(), vec![0; 4096]);

    disk.set_capacity(None);
    v.write(4 * MIB, &[0xbb; 4096], false).await.unwrap();
    pool.flush().await.unwrap();
    assert_clean(&pool);
    drop(v);
    drop(pool);
    disk.crash(5);
    let pool = open(&disk);
    assert_clean(&pool);
    let v = pool.open_session("v", client()).unwrap();
    assert_eq!(v.read(0, 4096).await.unwrap(), vec![0xcc; 4096]);
    assert_eq!(v.read(4096, 4096).await.unwrap(), vec![0xaa; 4096]);
    assert_eq!(v.read(4 * MIB, 4096).await.unwrap(), vec![0xbb; 4096]);
}
