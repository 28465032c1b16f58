//! Damaged pool files give clear errors naming what is damaged; a torn journal tail is cut and
//! the pool opens with everything up to the last complete sync point.

#![allow(clippy::unwrap_used)]

use grove_engine::io::sim::SimDisk;
use grove_engine::io::FileKind;
use grove_engine::*;

fn client() -> SessionClient {
    SessionClient {
        protocol: "test".into(),
        address: "sim".into(),
    }
}

async fn pool_with_data(disk: &SimDisk) {
    let pool = Pool::open_with_backend(disk.backend(), 1 << 20, None).unwrap();
    pool.create_volume("v", 64 << 20).await.unwrap();
    let s = pool.open_session("v", client()).unwrap();
    for i in 0..300u64 {
        s.write(i * 8192, &[i as u8; 4096], false).await.unwrap();
    }
    drop(s);
    pool.commit(
        "v",
        "main",
        CommitRequest {
            message: "c".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

fn reopen(disk: &SimDisk) -> Result<Pool> {
    Pool::open_with_backend(disk.backend(), 1 << 20, None)
}

#[tokio::test]
async fn a_damaged_node_is_named() {
    let disk = SimDisk::new();
    pool_with_data(&disk).await;
    disk.corrupt(FileKind::Meta, 4096 + 100, &[0xff; 8]);
    match reopen(&disk) {
        Err(Error::Corrupt { what, at }) => {
            assert!(what.contains("extent-map node"), "{what}");
            assert_eq!(at, "meta page 1");
        }
        Err(other) => panic!("expected a corruption error, got {other}"),
        Ok(_) => panic!("a damaged node went unnoticed"),
    }
}

#[tokio::test]
async fn damaged_headers_are_named() {
    for (file, name) in [
        (FileKind::Journal, "journal.grove"),
        (FileKind::Data, "data.grove"),
        (FileKind::Meta, "meta.grove"),
    ] {
        let disk = SimDisk::new();
        pool_with_data(&disk).await;
        disk.corrupt(file, 3, b"XX");
        match reopen(&disk) {
            Err(Error::Corrupt { what, .. }) => assert!(what.contains(name), "{what}"),
            Err(other) => panic!("expected a corruption error for {name}, got {other}"),
            Ok(_) => panic!("a damaged {name} header went unnoticed"),
        }
    }
}

#[tokio::test]
async fn a_torn_journal_tail_is_cut() {
    let disk = SimDisk::new();
    pool_with_data(&disk).await;
    let journal = disk.file_image(FileKind::Journal);
    // Half a record of garbage after the last sync point, as an interrupted append leaves.
    disk.corrupt(
        FileKind::Journal,
        journal.len() as u64,
        b"GRVR\x40\x00\x00\x00garbage",
    );
    let pool = reopen(&disk).unwrap();
    assert_eq!(disk.file_image(FileKind::Journal).len(), journal.len());
    let s = pool.open_session("v", client()).unwrap();
    assert_eq!(s.read(299 * 8192, 4096).await.unwrap(), vec![43u8; 4096]);
    assert_eq!(pool.log("v", None).unwrap().len(), 1);
}

#[tokio::test]
async fn a_damaged_record_before_intact_ones_is_refused() {
    let disk = SimDisk::new();
    pool_with_data(&disk).await;
    // The first record's payload starts after the header page and its 16-byte frame.
    disk.corrupt(FileKind::Journal, 4096 + 20, b"\xff");
    let before = disk.file_image(FileKind::Journal).len();
    match reopen(&disk) {
        Err(Error::Corrupt { what, .. }) => {
            assert!(what.contains("intact records after it"), "{what}")
        }
        Err(other) => panic!("expected a corruption error, got {other}"),
        Ok(_) => panic!("a damaged journal record went unnoticed"),
    }
    // Nothing was cut.
    assert_eq!(disk.file_image(FileKind::Journal).len(), before);
}

#[tokio::test]
async fn a_lost_journal_is_not_replaced_by_a_new_pool() {
    let disk = SimDisk::new();
    pool_with_data(&disk).await;
    disk.backend().set_len(FileKind::Journal, 0).unwrap();
    match reopen(&disk) {
        Err(Error::Corrupt { what, .. }) => {
            assert!(what.contains("journal.grove is missing"), "{what}")
        }
        Err(other) => panic!("expected a corruption error, got {other}"),
        Ok(_) => panic!("a new pool was created over existing data"),
    }
}
