//! Commands against a real pool in a temporary directory, named after the spec sections they
//! pin.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use grove_engine::{CommitRequest, Pool, PoolOptions, SessionClient};

use super::*;

const VOLUME_BYTES: u64 = 16 << 20;
const BLOCKS: u64 = VOLUME_BYTES / 512;

struct Fixture {
    _dir: tempfile::TempDir,
    pool: Pool,
    shared: Arc<LuShared>,
}

static NEXUS_IDS: AtomicU64 = AtomicU64::new(1);

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut options = PoolOptions::new(dir.path());
        options.cache_bytes = 8 << 20;
        let pool = Pool::open(options).unwrap();
        pool.create_volume("vol", VOLUME_BYTES).await.unwrap();
        Fixture {
            _dir: dir,
            pool,
            shared: LuShared::new(),
        }
    }

    /// A nexus on `export`, its power-on unit attention already cleared.
    async fn lun_on(&self, export: &str, initiator: &str, isid_tail: u8) -> Lun {
        let session = self
            .pool
            .open_session(
                export,
                SessionClient {
                    protocol: "iscsi".into(),
                    address: "test".into(),
                },
            )
            .unwrap();
        let nexus = Nexus {
            id: NEXUS_IDS.fetch_add(1, Ordering::Relaxed),
            initiator_name: initiator.into(),
            isid: [0x80, 0, 0, 0, 0, isid_tail],
            target_name: format!("iqn.2026-01.io.grove:{export}"),
        };
        let lun = Lun::new(session, self.shared.clone(), nexus);
        let first = run(&lun, &[0; 6], &[], 0).await;
        assert_eq!(sense_of(&first), (0x6, 0x29, 0x00));
        lun
    }

    async fn lun(&self, initiator: &str) -> Lun {
        self.lun_on("vol", initiator, 1).await
    }
}

async fn run(lun: &Lun, cdb: &[u8], data_out: &[u8], expected_in: u32) -> Response {
    let mut full = cdb.to_vec();
    full.resize(16.max(cdb.len()), 0);
    lun.execute(&Command {
        cdb: &full,
        data_out,
        expected_in,
        expected_out: data_out.len() as u32,
    })
    .await
}

fn sense_of(response: &Response) -> (u8, u8, u8) {
    let sense = response.sense.as_deref().unwrap_or(&[0; 18]);
    (sense[2] & 0x0f, sense[12], sense[13])
}

fn good(response: &Response) {
    assert_eq!(
        response.status,
        Status::Good,
        "sense {:?}",
        sense_of(response)
    );
}

fn rw10(opcode: u8, lba: u32, blocks: u16) -> Vec<u8> {
    let mut cdb = vec![opcode, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

fn rw16(opcode: u8, lba: u64, blocks: u32) -> Vec<u8> {
    let mut cdb = vec![0u8; 16];
    cdb[0] = opcode;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

fn caw(lba: u64, blocks: u8) -> Vec<u8> {
    let mut cdb = rw16(0x89, lba, 0);
    cdb[13] = blocks;
    cdb
}

async fn serial(lun: &Lun) -> Vec<u8> {
    run(lun, &[0x12, 1, 0x80, 0, 255, 0], &[], 255)
        .await
        .data_in
}

async fn read(lun: &Lun, lba: u32, blocks: u16) -> Vec<u8> {
    let response = run(lun, &rw10(0x28, lba, blocks), &[], u32::from(blocks) * 512).await;
    good(&response);
    response.data_in
}

#[tokio::test]
async fn sbc3_5_read_after_write_in_every_cdb_size() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    let data: Vec<u8> = (0..2048u32).map(|i| (i % 251) as u8).collect();
    good(&run(&lun, &rw10(0x2a, 3, 4), &data, 0).await);
    assert_eq!(read(&lun, 3, 4).await, data);
    let r16 = run(&lun, &rw16(0x88, 3, 4), &[], 2048).await;
    assert_eq!(r16.data_in, data);
    let mut r12 = vec![0xa8, 0, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0];
    assert_eq!(run(&lun, &r12, &[], 2048).await.data_in, data);
    // READ(6) of 0 blocks transfers 256.
    let r6 = run(&lun, &[0x08, 0, 0, 3, 0, 0], &[], 256 * 512).await;
    good(&r6);
    assert_eq!(&r6.data_in[..2048], &data[..]);
    r12[0] = 0xaa;
    good(&run(&lun, &r12, &vec![7; 2048], 0).await);
    assert_eq!(read(&lun, 3, 4).await, vec![7; 2048]);
}

#[tokio::test]
async fn rfc7143_11_4_5_read_residuals() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    let none = run(&lun, &rw10(0x28, 0, 1), &[], 0).await;
    good(&none);
    assert_eq!(none.residual, Residual::Overflow(512));
    let more = run(&lun, &rw10(0x28, 0, 1), &[], 10000).await;
    assert_eq!(
        (more.data_in.len(), more.residual),
        (512, Residual::Underflow(9488))
    );
    let less = run(&lun, &rw10(0x28, 0, 1), &[], 200).await;
    assert_eq!(
        (less.data_in.len(), less.residual),
        (200, Residual::Overflow(312))
    );
}

#[tokio::test]
async fn rfc7143_11_4_5_write_residuals_write_only_what_both_sides_cover() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    good(&run(&lun, &rw10(0x2a, 0, 2), &[b'a'; 1024], 0).await);
    // One block in the CDB, 200 bytes expected: 200 bytes written, overflow.
    let short = run(&lun, &rw10(0x2a, 0, 1), &[b'b'; 200], 0).await;
    good(&short);
    assert_eq!(short.residual, Residual::Overflow(312));
    let data = read(&lun, 0, 2).await;
    assert!(data[..200].iter().all(|b| *b == b'b'));
    assert!(data[200..].iter().all(|b| *b == b'a'));
    // One block in the CDB, two expected: one written, underflow.
    let long = run(&lun, &rw10(0x2a, 0, 1), &[b'c'; 1024], 0).await;
    assert_eq!(long.residual, Residual::Underflow(512));
    let data = read(&lun, 0, 2).await;
    assert!(data[..512].iter().all(|b| *b == b'c'));
    assert!(data[512..].iter().all(|b| *b == b'a'));
}

#[tokio::test]
async fn sbc3_4_5_lba_out_of_range_and_protection_fields() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    let last = (BLOCKS - 1) as u32;
    good(&run(&lun, &rw10(0x28, last, 1), &[], 512).await);
    good(&run(&lun, &rw10(0x28, 0, 0), &[], 0).await);
    for (lba, blocks) in [(last, 2), (last + 2, 0), (u32::MAX, 1), (0x8000_0000, 0)] {
        let response = run(&lun, &rw10(0x28, lba, blocks), &[], 1024).await;
        assert_eq!(sense_of(&response), (0x5, 0x21, 0x00));
    }
    let over = run(&lun, &rw16(0x8a, u64::MAX, 1), &[0; 512], 0).await;
    assert_eq!(sense_of(&over), (0x5, 0x21, 0x00));
    let mut protected = rw10(0x28, 0, 1);
    protected[1] = 0x20;
    assert_eq!(
        sense_of(&run(&lun, &protected, &[], 512).await),
        (0x5, 0x24, 0x00)
    );
    // DPO and FUA are accepted.
    let mut fua = rw10(0x2a, 0, 1);
    fua[1] = 0x18;
    good(&run(&lun, &fua, &[1; 512], 0).await);
}

#[tokio::test]
async fn spc4_unknown_opcode_and_nexus_attention() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    assert_eq!(
        sense_of(&run(&lun, &[0xc5], &[], 0).await),
        (0x5, 0x20, 0x00)
    );
    let empty = Command {
        cdb: &[],
        data_out: &[],
        expected_in: 0,
        expected_out: 0,
    };
    assert_eq!(sense_of(&lun.execute(&empty).await), (0x5, 0x20, 0x00));
    // A CDB shorter than its opcode's group needs.
    let short = Command {
        cdb: &[0x28, 0, 0],
        ..empty
    };
    assert_eq!(sense_of(&lun.execute(&short).await), (0x5, 0x24, 0x00));
    good(&run(&lun, &[0; 6], &[], 0).await);
}

#[tokio::test]
async fn spc4_6_6_inquiry_standard_and_vpd() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    let standard = run(&lun, &[0x12, 0, 0, 1, 4, 0], &[], 260).await;
    good(&standard);
    let data = &standard.data_in;
    assert_eq!(data[4] as usize, data.len() - 5);
    assert_eq!(&data[8..13], b"GROVE");
    assert_eq!(&data[16..28], b"grove volume");
    assert_eq!(
        standard.residual,
        Residual::Underflow(260 - data.len() as u32)
    );
    // EVPD clear with a page code is invalid.
    assert_eq!(
        sense_of(&run(&lun, &[0x12, 0, 1, 1, 0, 0], &[], 256).await),
        (0x5, 0x24, 0)
    );
    let pages = run(&lun, &[0x12, 1, 0, 0, 255, 0], &[], 255).await;
    assert_eq!(
        &pages.data_in[4..],
        &[0x00, 0x80, 0x83, 0x86, 0xb0, 0xb1, 0xb2]
    );
    for page in [0x80, 0x83, 0x86, 0xb0, 0xb1, 0xb2] {
        let response = run(&lun, &[0x12, 1, page, 0, 255, 0], &[], 255).await;
        good(&response);
        assert_eq!(response.data_in[1], page);
        assert_eq!(
            u16::from_be_bytes([response.data_in[2], response.data_in[3]]) as usize + 4,
            response.data_in.len()
        );
    }
    let limits = run(&lun, &[0x12, 1, 0xb0, 0, 255, 0], &[], 255)
        .await
        .data_in;
    assert_eq!(limits[3], 0x3c);
    let lbp = run(&lun, &[0x12, 1, 0xb2, 0, 255, 0], &[], 255)
        .await
        .data_in;
    assert_eq!(lbp[5] & 0xe4, 0xe4);
    assert_eq!(
        sense_of(&run(&lun, &[0x12, 1, 0x99, 0, 255, 0], &[], 255).await),
        (0x5, 0x24, 0)
    );
    // Truncated to the allocation length.
    assert_eq!(
        run(&lun, &[0x12, 1, 0x83, 0, 8, 0], &[], 255)
            .await
            .data_in
            .len(),
        8
    );
}

#[tokio::test]
async fn spc4_7_8_6_identifiers_follow_the_ref() {
    let f = Fixture::new().await;
    f.pool.create_branch("vol", "dev", None).await.unwrap();
    let main = f.lun("iqn.a").await;
    let other = LuShared::new();
    let dev_session = f
        .pool
        .open_session(
            "vol@dev",
            SessionClient {
                protocol: "iscsi".into(),
                address: "t".into(),
            },
        )
        .unwrap();
    let dev = Lun::new(dev_session, other, main.nexus().clone());
    let _ = run(&dev, &[0; 6], &[], 0).await;
    let again = f.lun_on("vol", "iqn.b", 2).await;
    assert_eq!(serial(&main).await, serial(&again).await);
    assert_ne!(serial(&main).await, serial(&dev).await);
}

#[tokio::test]
async fn sbc3_5_15_5_16_read_capacity() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    let rc10 = run(&lun, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8)
        .await
        .data_in;
    assert_eq!(
        rc10,
        [
            &((BLOCKS - 1) as u32).to_be_bytes()[..],
            &512u32.to_be_bytes()
        ]
        .concat()
    );
    let mut cdb = rw16(0x9e, 0, 32);
    cdb[1] = 0x10;
    let rc16 = run(&lun, &cdb, &[], 32).await.data_in;
    assert_eq!(
        u64::from_be_bytes(rc16[0..8].try_into().unwrap()),
        BLOCKS - 1
    );
    assert_eq!(rc16[13], 3);
    assert_eq!(rc16[14] & 0xc0, 0xc0);
    cdb[13] = 12;
    assert_eq!(run(&lun, &cdb, &[], 32).await.data_in.len(), 12);
}

#[tokio::test]
async fn sbc3_5_27_verify_compares_bytes() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    good(&run(&lun, &rw10(0x2a, 10, 2), &[9; 1024], 0).await);
    let mut verify = rw10(0x2f, 10, 2);
    verify[1] = 0x02;
    good(&run(&lun, &verify, &[9; 1024], 0).await);
    let mut different = vec![9; 1024];
    different[700] = 1;
    let miscompare = run(&lun, &verify, &different, 0).await;
    assert_eq!(sense_of(&miscompare), (0xe, 0x1d, 0x00));
    let sense = miscompare.sense.unwrap();
    assert_eq!(sense[0] & 0x80, 0x80);
    assert_eq!(u32::from_be_bytes(sense[3..7].try_into().unwrap()), 700);
    // BYTCHK 0: no compare.
    verify[1] = 0;
    good(&run(&lun, &verify, &[], 0).await);
    // BYTCHK 11b: one block against every block.
    verify[1] = 0x06;
    good(&run(&lun, &verify, &[9; 512], 0).await);
    verify[1] = 0x04;
    assert_eq!(sense_of(&run(&lun, &verify, &[], 0).await), (0x5, 0x24, 0));
}

#[tokio::test]
async fn sbc3_5_2_compare_and_write() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    good(&run(&lun, &rw10(0x2a, 0, 1), &[b'A'; 512], 0).await);
    let mut data = vec![b'A'; 512];
    data.extend_from_slice(&[b'B'; 512]);
    good(&run(&lun, &caw(0, 1), &data, 0).await);
    assert_eq!(read(&lun, 0, 1).await, vec![b'B'; 512]);
    let mut wrong = vec![b'B'; 512];
    wrong[33] = b'Z';
    wrong.extend_from_slice(&[b'C'; 512]);
    let miscompare = run(&lun, &caw(0, 1), &wrong, 0).await;
    assert_eq!(sense_of(&miscompare), (0xe, 0x1d, 0x00));
    assert_eq!(
        miscompare.sense.as_deref().map(|s| s[6]),
        Some(33),
        "{:?}",
        miscompare.sense
    );
    assert_eq!(read(&lun, 0, 1).await, vec![b'B'; 512]);
    // The data-out must hold both halves.
    assert_eq!(
        run(&lun, &caw(0, 1), &[b'B'; 512], 0).await.status,
        Status::CheckCondition
    );
    assert_eq!(
        sense_of(&run(&lun, &caw(BLOCKS - 1, 2), &[0; 2048], 0).await).1,
        0x21
    );
}

#[tokio::test]
async fn sbc3_5_4_orwrite() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    good(&run(&lun, &rw16(0x8a, 7, 2), &[0x0f; 1024], 0).await);
    good(&run(&lun, &rw16(0x8b, 7, 2), &[0xa0; 1024], 0).await);
    assert_eq!(read(&lun, 7, 2).await, vec![0xaf; 1024]);
    let mut protected = rw16(0x8b, 7, 1);
    protected[1] = 0x20;
    assert_eq!(
        sense_of(&run(&lun, &protected, &[0; 512], 0).await),
        (0x5, 0x24, 0)
    );
    assert_eq!(
        sense_of(&run(&lun, &rw16(0x8b, BLOCKS, 1), &[0; 512], 0).await),
        (0x5, 0x21, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sbc3_5_2_compare_and_write_is_atomic_between_nexuses() {
    let f = Fixture::new().await;
    let a = Arc::new(f.lun("iqn.a").await);
    let b = Arc::new(f.lun("iqn.b").await);
    good(&run(&a, &rw10(0x2a, 0, 1), &[0; 512], 0).await);
    let increments = |lun: Arc<Lun>| async move {
        let mut done = 0;
        while done < 40 {
            let current = read(&lun, 0, 1).await;
            let value = u64::from_be_bytes(current[..8].try_into().unwrap());
            let mut next = current.clone();
            next[..8].copy_from_slice(&(value + 1).to_be_bytes());
            let mut data = current;
            data.extend_from_slice(&next);
            if run(&lun, &caw(0, 1), &data, 0).await.status == Status::Good {
                done += 1;
            }
        }
    };
    let (x, y) = tokio::join!(
        tokio::spawn(increments(a.clone())),
        tokio::spawn(increments(b))
    );
    x.unwrap();
    y.unwrap();
    let value = u64::from_be_bytes(read(&a, 0, 1).await[..8].try_into().unwrap());
    assert_eq!(value, 80);
}

#[tokio::test]
async fn sbc3_5_25_unmap_reads_zeros_and_reports_deallocated() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    good(&run(&lun, &rw10(0x2a, 0, 64), &[5; 64 * 512], 0).await);
    let mut list = vec![0u8; 24];
    list[1] = 22;
    list[3] = 16;
    list[8..16].copy_from_slice(&8u64.to_be_bytes());
    list[16..20].copy_from_slice(&19u32.to_be_bytes());
    let cdb = [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0];
    good(&run(&lun, &cdb, &list, 0).await);
    let data = read(&lun, 0, 64).await;
    assert!(data[..8 * 512].iter().all(|b| *b == 5));
    assert!(data[8 * 512..27 * 512].iter().all(|b| *b == 0));
    assert!(data[27 * 512..].iter().all(|b| *b == 5));
    // GET LBA STATUS at 8: 16 whole deallocated blocks (partial ones stay mapped).
    let mut status = rw16(0x9e, 8, 24);
    status[1] = 0x12;
    let response = run(&lun, &status, &[], 24).await;
    good(&response);
    let d = &response.data_in[8..24];
    assert_eq!(u64::from_be_bytes(d[0..8].try_into().unwrap()), 8);
    assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), 16);
    assert_eq!(d[12], 1);
    let mut beyond = rw16(0x9e, BLOCKS, 24);
    beyond[1] = 0x12;
    assert_eq!(sense_of(&run(&lun, &beyond, &[], 24).await), (0x5, 0x21, 0));
    // Out of range descriptor: nothing is unmapped.
    list[8..16].copy_from_slice(&(BLOCKS - 1).to_be_bytes());
    assert_eq!(sense_of(&run(&lun, &cdb, &list, 0).await), (0x5, 0x21, 0));
    // No descriptors.
    good(
        &run(
            &lun,
            &[0x42, 0, 0, 0, 0, 0, 0, 0, 8, 0],
            &[0, 6, 0, 0, 0, 0, 0, 0],
            0,
        )
        .await,
    );
    good(&run(&lun, &[0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0).await);
}

#[tokio::test]
async fn sbc3_5_40_write_same() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    let pattern: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
    good(&run(&lun, &rw10(0x41, 5, 9), &pattern, 0).await);
    let data = read(&lun, 5, 9).await;
    assert!(data.chunks(512).all(|block| block == &pattern[..]));
    let mut unmap = rw10(0x41, 5, 9);
    unmap[1] = 0x08;
    good(&run(&lun, &unmap, &[0; 512], 0).await);
    assert!(read(&lun, 5, 9).await.iter().all(|b| *b == 0));
    // UNMAP unmaps whatever the data block holds: the range reads as zeros.
    good(&run(&lun, &rw10(0x41, 5, 9), &pattern, 0).await);
    good(&run(&lun, &unmap, &pattern, 0).await);
    assert!(read(&lun, 5, 9).await.iter().all(|b| *b == 0));
    // Half a block or two blocks of data-out are refused.
    assert_eq!(
        run(&lun, &unmap, &[0; 256], 0).await.status,
        Status::CheckCondition
    );
    assert_eq!(
        run(&lun, &unmap, &[0; 1024], 0).await.status,
        Status::CheckCondition
    );
    // ANCHOR is not supported.
    unmap[1] = 0x18;
    assert_eq!(
        sense_of(&run(&lun, &unmap, &[0; 512], 0).await),
        (0x5, 0x24, 0)
    );
    // 0 blocks: to the end of the medium; NDOB writes zeros.
    good(&run(&lun, &rw16(0x8a, BLOCKS - 2, 2), &[3; 1024], 0).await);
    let mut to_end = rw16(0x93, BLOCKS - 2, 0);
    to_end[1] = 0x09;
    good(&run(&lun, &to_end, &[], 0).await);
    let tail = run(&lun, &rw16(0x88, BLOCKS - 2, 2), &[], 1024)
        .await
        .data_in;
    assert!(tail.iter().all(|b| *b == 0));
    let beyond = run(&lun, &rw10(0x41, (BLOCKS - 1) as u32, 2), &pattern, 0).await;
    assert_eq!(sense_of(&beyond), (0x5, 0x21, 0));
}

#[tokio::test]
async fn sbc3_4_11_read_only_refs_refuse_writes() {
    let f = Fixture::new().await;
    let commit = f
        .pool
        .commit(
            "vol",
            "main",
            CommitRequest {
                message: "c".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let lun = f
        .lun_on(&format!("vol@{}", commit.id.to_hex()), "iqn.a", 1)
        .await;
    let protected = (0x7, 0x27, 0x00);
    assert_eq!(
        sense_of(&run(&lun, &rw10(0x2a, 0, 1), &[1; 512], 0).await),
        protected
    );
    assert_eq!(
        sense_of(&run(&lun, &rw10(0x41, 0, 1), &[1; 512], 0).await),
        protected
    );
    let mut data = vec![0; 512];
    data.extend_from_slice(&[1; 512]);
    assert_eq!(sense_of(&run(&lun, &caw(0, 1), &data, 0).await), protected);
    let mut list = vec![0u8; 24];
    list[1] = 22;
    list[3] = 16;
    list[19] = 1;
    assert_eq!(
        sense_of(&run(&lun, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list, 0).await),
        protected
    );
    let mode = run(&lun, &[0x1a, 0, 0x3f, 0, 255, 0], &[], 255)
        .await
        .data_in;
    assert_eq!(mode[2] & 0x80, 0x80);
    good(&run(&lun, &rw10(0x28, 0, 1), &[], 512).await);
}

#[tokio::test]
async fn spc4_6_11_mode_sense_and_select() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    let other = f.lun("iqn.b").await;
    let all = run(&lun, &[0x1a, 0, 0x3f, 0, 255, 0], &[], 255).await;
    good(&all);
    let data = &all.data_in;
    assert_eq!(data[0] as usize, data.len() - 1);
    assert_eq!(data[2], 0x10);
    assert_eq!(data[3], 8);
    assert_eq!(&data[12..14], &[0x08, 0x12]);
    assert_eq!(&data[32..34], &[0x0a, 0x0a]);
    assert!(matches!(all.residual, Residual::Underflow(_)));
    // DBD, and a short allocation length.
    let dbd = run(&lun, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[], 255)
        .await
        .data_in;
    assert_eq!((dbd[3], dbd.len()), (0, 16));
    let short = run(&lun, &[0x1a, 0, 0x3f, 0, 4, 0], &[], 4).await;
    assert_eq!((short.data_in.len(), short.residual), (4, Residual::None));
    // MODE SENSE(10) with long LBA descriptors.
    let ten = run(&lun, &[0x5a, 0x10, 0x08, 0, 0, 0, 0, 0, 255, 0], &[], 255)
        .await
        .data_in;
    assert_eq!((ten[4], ten[7]), (1, 16));
    assert_eq!(
        sense_of(&run(&lun, &[0x1a, 0, 0xc8, 0, 255, 0], &[], 255).await),
        (0x5, 0x39, 0)
    );
    assert_eq!(
        sense_of(&run(&lun, &[0x1a, 0, 0x01, 0, 255, 0], &[], 255).await),
        (0x5, 0x24, 0)
    );
    let changeable = run(&lun, &[0x1a, 0x08, 0x4a, 0, 255, 0], &[], 255)
        .await
        .data_in;
    assert_eq!(changeable[4 + 4], 0x08);
    // Setting SWP write-protects the unit for every nexus.
    let mut control = run(&lun, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[], 255)
        .await
        .data_in;
    control[0] = 0;
    control[4 + 4] |= 0x08;
    good(
        &run(
            &lun,
            &[0x15, 0x10, 0, 0, control.len() as u8, 0],
            &control,
            0,
        )
        .await,
    );
    assert_eq!(
        sense_of(&run(&lun, &rw10(0x2a, 0, 1), &[1; 512], 0).await),
        (0x7, 0x27, 0x02)
    );
    assert_eq!(
        sense_of(&run(&other, &[0; 6], &[], 0).await),
        (0x6, 0x2a, 0x01)
    );
    assert_eq!(
        sense_of(&run(&other, &rw10(0x2a, 0, 1), &[1; 512], 0).await),
        (0x7, 0x27, 0x02)
    );
    let sense = run(&lun, &[0x1a, 0x08, 0x3f, 0, 255, 0], &[], 255)
        .await
        .data_in;
    assert_eq!(sense[2] & 0x80, 0x80);
    control[4 + 4] &= !0x08;
    good(
        &run(
            &lun,
            &[0x15, 0x10, 0, 0, control.len() as u8, 0],
            &control,
            0,
        )
        .await,
    );
    good(&run(&lun, &rw10(0x2a, 0, 1), &[1; 512], 0).await);
    // A LUN reset returns the parameters to their defaults.
    control[4 + 4] |= 0x08;
    good(
        &run(
            &lun,
            &[0x15, 0x10, 0, 0, control.len() as u8, 0],
            &control,
            0,
        )
        .await,
    );
    lun.reset();
    assert_eq!(
        sense_of(&run(&lun, &[0; 6], &[], 0).await),
        (0x6, 0x29, 0x03)
    );
    good(&run(&lun, &rw10(0x2a, 0, 1), &[1; 512], 0).await);
    control[4 + 4] &= !0x08;
    // A field that is not changeable is refused.
    control[4 + 3] ^= 0x10;
    let refused = run(
        &lun,
        &[0x15, 0x10, 0, 0, control.len() as u8, 0],
        &control,
        0,
    )
    .await;
    assert_eq!(sense_of(&refused), (0x5, 0x26, 0));
}

#[test]
fn transfers_beyond_the_limit_are_refused_before_any_data() {
    assert!(precheck(&rw10(0x2a, 0, 1), 512).is_none());
    let refused = precheck(&rw10(0x2a, 0, 0xffff), MAX_TRANSFER_BYTES + 1).unwrap();
    assert_eq!(sense_of(&refused), (0x5, 0x24, 0));
    assert_eq!(refused.sense.unwrap()[17], 7);
}

#[test]
fn sam5_other_luns_are_not_supported() {
    let command = |cdb: &'static [u8]| Command {
        cdb,
        data_out: &[],
        expected_in: 255,
        expected_out: 0,
    };
    let inquiry = unsupported_lun(&command(&[0x12, 0, 0, 0, 255, 0]));
    assert_eq!(inquiry.data_in[0], 0x7f);
    let luns = unsupported_lun(&command(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 0, 0]));
    assert_eq!(luns.data_in.len(), 16);
    assert_eq!(
        sense_of(&unsupported_lun(&command(&[0x28; 10]))),
        (0x5, 0x25, 0)
    );
}

#[tokio::test]
async fn spc4_6_33_report_luns_and_request_sense() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    let luns = run(&lun, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 0, 0], &[], 255).await;
    assert_eq!(
        luns.data_in,
        [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    let none = run(&lun, &[0x03, 0, 0, 0, 18, 0], &[], 18).await;
    good(&none);
    assert_eq!(none.data_in[2] & 0x0f, 0);
    lun.reset();
    // INQUIRY neither reports nor clears the attention; REQUEST SENSE reports and clears it.
    good(&run(&lun, &[0x12, 0, 0, 0, 36, 0], &[], 36).await);
    let sense = run(&lun, &[0x03, 0, 0, 0, 18, 0], &[], 18).await;
    good(&sense);
    assert_eq!(
        (sense.data_in[2], sense.data_in[12], sense.data_in[13]),
        (0x6, 0x29, 0x03)
    );
    good(&run(&lun, &[0; 6], &[], 0).await);
    let descriptor = run(&lun, &[0x03, 1, 0, 0, 18, 0], &[], 18).await;
    assert_eq!(descriptor.data_in[0], 0x72);
}

#[tokio::test]
async fn spc4_6_35_report_supported_operation_codes() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    let all = run(
        &lun,
        &[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0],
        &[],
        65535,
    )
    .await;
    good(&all);
    let len = u32::from_be_bytes(all.data_in[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, all.data_in.len());
    assert_eq!(len % 8, 0);
    let one = |options: u8, opcode: u8, action: u16| {
        let mut cdb = vec![0xa3, 0x0c, options, opcode, 0, 0, 0, 0, 0x10, 0, 0, 0];
        cdb[4..6].copy_from_slice(&action.to_be_bytes());
        cdb
    };
    let read10 = run(&lun, &one(1, 0x28, 0), &[], 4096).await.data_in;
    assert_eq!((read10[1] & 0x07, read10[3]), (3, 10));
    assert_eq!(read10[4 + 1] & 0x18, 0x18);
    assert_eq!(
        sense_of(&run(&lun, &one(2, 0x28, 0), &[], 4096).await),
        (0x5, 0x24, 0)
    );
    assert_eq!(
        sense_of(&run(&lun, &one(1, 0x9e, 0x10), &[], 4096).await),
        (0x5, 0x24, 0)
    );
    let rc16 = run(&lun, &one(2, 0x9e, 0x10), &[], 4096).await.data_in;
    assert_eq!((rc16[1] & 0x07, rc16[3], rc16[5]), (3, 16, 0x10));
    let unsupported = run(&lun, &one(1, 0xc5, 0), &[], 4096).await.data_in;
    assert_eq!(unsupported[1] & 0x07, 1);
    // With timeouts descriptors.
    let mut rctd = vec![0xa3, 0x0c, 0x80, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0];
    let timed = run(&lun, &rctd, &[], 65535).await.data_in;
    assert_eq!(timed[4 + 5] & 0x02, 0x02);
    assert_eq!((timed.len() - 4) % 20, 0);
    rctd[2] = 0x07;
    assert_eq!(
        sense_of(&run(&lun, &rctd, &[], 65535).await),
        (0x5, 0x24, 0)
    );
}

fn prout(action: u8, kind: u8, key: u64, service_key: u64) -> (Vec<u8>, Vec<u8>) {
    let cdb = vec![0x5f, action, kind, 0, 0, 0, 0, 0, 24, 0];
    let mut list = vec![0u8; 24];
    list[0..8].copy_from_slice(&key.to_be_bytes());
    list[8..16].copy_from_slice(&service_key.to_be_bytes());
    (cdb, list)
}

async fn pr_out(lun: &Lun, action: u8, kind: u8, key: u64, service_key: u64) -> Response {
    let (cdb, list) = prout(action, kind, key, service_key);
    run(lun, &cdb, &list, 0).await
}

async fn read_keys(lun: &Lun) -> (u32, Vec<u64>) {
    let response = run(lun, &[0x5e, 0, 0, 0, 0, 0, 0, 0x10, 0, 0], &[], 4096).await;
    good(&response);
    let data = response.data_in;
    let generation = u32::from_be_bytes(data[0..4].try_into().unwrap());
    let keys = data[8..]
        .chunks(8)
        .map(|k| u64::from_be_bytes(k.try_into().unwrap()))
        .collect();
    (generation, keys)
}

#[tokio::test]
async fn spc4_5_13_persistent_reservation_access() {
    let f = Fixture::new().await;
    let a = f.lun("iqn.a").await;
    let b = f.lun("iqn.b").await;
    let c = f.lun("iqn.c").await;
    good(&pr_out(&a, 0x06, 0, 0, 0xa).await);
    good(&pr_out(&b, 0x00, 0, 0, 0xb).await);
    // REGISTER with a wrong key conflicts.
    assert_eq!(
        pr_out(&b, 0x00, 0, 0x99, 0xbb).await.status,
        Status::ReservationConflict
    );
    let (generation, keys) = read_keys(&c).await;
    assert_eq!((generation, keys), (2, vec![0xa, 0xb]));
    let write = rw10(0x2a, 0, 1);
    for (kind, registered_write, registered_read, other_write, other_read) in [
        (1u8, false, true, false, true),
        (3, false, false, false, false),
        (5, true, true, false, true),
        (6, true, true, false, false),
        (7, true, true, false, true),
        (8, true, true, false, false),
    ] {
        good(&pr_out(&a, 0x01, kind, 0xa, 0).await);
        let reservation = run(&c, &[0x5e, 1, 0, 0, 0, 0, 0, 0, 255, 0], &[], 255)
            .await
            .data_in;
        assert_eq!(reservation[21], kind);
        let expected_key = if kind >= 7 { 0 } else { 0xa };
        assert_eq!(
            u64::from_be_bytes(reservation[8..16].try_into().unwrap()),
            expected_key
        );
        good(&run(&a, &write, &[1; 512], 0).await);
        let status = |r: Response| r.status == Status::Good;
        assert_eq!(
            status(run(&b, &write, &[1; 512], 0).await),
            registered_write,
            "type {kind}"
        );
        assert_eq!(
            status(run(&b, &rw10(0x28, 0, 1), &[], 512).await),
            registered_read,
            "type {kind}"
        );
        assert_eq!(
            status(run(&c, &write, &[1; 512], 0).await),
            other_write,
            "type {kind}"
        );
        assert_eq!(
            status(run(&c, &rw10(0x28, 0, 1), &[], 512).await),
            other_read,
            "type {kind}"
        );
        // INQUIRY and TEST UNIT READY are never refused.
        good(&run(&c, &[0x12, 0, 0, 0, 36, 0], &[], 36).await);
        good(&run(&c, &[0; 6], &[], 0).await);
        // Releasing with the wrong type is an error; with the right one it ends it.
        let wrong = if kind == 1 { 3 } else { 1 };
        assert_eq!(
            sense_of(&pr_out(&a, 0x02, wrong, 0xa, 0).await),
            (0x5, 0x26, 0x04)
        );
        good(&pr_out(&a, 0x02, kind, 0xa, 0).await);
        if kind >= 5 {
            assert_eq!(sense_of(&run(&b, &[0; 6], &[], 0).await), (0x6, 0x2a, 0x04));
        }
        good(&run(&c, &write, &[1; 512], 0).await);
    }
    let caps = run(&a, &[0x5e, 2, 0, 0, 0, 0, 0, 0, 8, 0], &[], 8)
        .await
        .data_in;
    assert_eq!(
        (caps[1], caps[2] & 0x01, caps[4], caps[5]),
        (8, 0, 0xea, 0x01)
    );
    let full = run(&a, &[0x5e, 3, 0, 0, 0, 0, 0, 0x10, 0, 0], &[], 4096)
        .await
        .data_in;
    assert!(full.windows(6).any(|w| w == b"iqn.a,"));
    // APTPL is refused.
    let (cdb, mut list) = prout(0x00, 0, 0xa, 0xa);
    list[20] = 0x01;
    assert_eq!(sense_of(&run(&a, &cdb, &list, 0).await), (0x5, 0x26, 0x00));
}

#[tokio::test]
async fn spc4_5_13_11_preempt_and_clear() {
    let f = Fixture::new().await;
    let a = f.lun("iqn.a").await;
    let b = f.lun("iqn.b").await;
    good(&pr_out(&a, 0x06, 0, 0, 0xa).await);
    good(&pr_out(&b, 0x06, 0, 0, 0xb).await);
    good(&pr_out(&a, 0x01, 3, 0xa, 0).await);
    let (generation, _) = read_keys(&a).await;
    // B preempts A's reservation: A loses its registration and hears of it.
    good(&pr_out(&b, 0x04, 1, 0xb, 0xa).await);
    let (after, keys) = read_keys(&b).await;
    assert_eq!((after, keys), (generation + 1, vec![0xb]));
    assert_eq!(sense_of(&run(&a, &[0; 6], &[], 0).await), (0x6, 0x2a, 0x05));
    let reservation = run(&a, &[0x5e, 1, 0, 0, 0, 0, 0, 0, 255, 0], &[], 255)
        .await
        .data_in;
    assert_eq!(
        (
            reservation[21],
            u64::from_be_bytes(reservation[8..16].try_into().unwrap())
        ),
        (1, 0xb)
    );
    // Preempting a key nobody holds conflicts.
    assert_eq!(
        pr_out(&b, 0x04, 1, 0xb, 0x77).await.status,
        Status::ReservationConflict
    );
    good(&pr_out(&a, 0x06, 0, 0, 0xa).await);
    good(&pr_out(&a, 0x03, 0, 0xa, 0).await);
    assert_eq!(read_keys(&a).await.1, Vec::<u64>::new());
    assert_eq!(sense_of(&run(&b, &[0; 6], &[], 0).await), (0x6, 0x2a, 0x03));
    good(&run(&b, &rw10(0x2a, 0, 1), &[1; 512], 0).await);
}

#[tokio::test]
async fn spc2_reserve_release_and_resets() {
    let f = Fixture::new().await;
    let a = f.lun("iqn.a").await;
    let b = f.lun("iqn.b").await;
    good(&run(&a, &[0x16, 0, 0, 0, 0, 0], &[], 0).await);
    good(&run(&a, &[0x16, 0, 0, 0, 0, 0], &[], 0).await);
    assert_eq!(
        run(&b, &[0x16, 0, 0, 0, 0, 0], &[], 0).await.status,
        Status::ReservationConflict
    );
    assert_eq!(
        run(&b, &[0x1a, 0, 0x3f, 0, 255, 0], &[], 255).await.status,
        Status::ReservationConflict
    );
    good(&run(&b, &[0x17, 0, 0, 0, 0, 0], &[], 0).await);
    good(&run(&a, &[0x1a, 0, 0x3f, 0, 255, 0], &[], 255).await);
    good(&run(&a, &[0x17, 0, 0, 0, 0, 0], &[], 0).await);
    good(&run(&b, &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0).await);
    // A LUN reset ends it, and every nexus hears of the reset.
    a.reset();
    assert_eq!(sense_of(&run(&a, &[0; 6], &[], 0).await), (0x6, 0x29, 0x03));
    assert_eq!(sense_of(&run(&b, &[0; 6], &[], 0).await), (0x6, 0x29, 0x03));
    good(&run(&a, &[0x16, 0, 0, 0, 0, 0], &[], 0).await);
    // So does the nexus's end.
    a.nexus_lost();
    good(&run(&b, &[0x16, 0, 0, 0, 0, 0], &[], 0).await);
}

#[tokio::test]
async fn sbc3_5_22_synchronize_cache_and_prefetch() {
    let f = Fixture::new().await;
    let lun = f.lun("iqn.a").await;
    good(&run(&lun, &rw10(0x35, 0, 0), &[], 0).await);
    good(&run(&lun, &rw16(0x91, 0, 8), &[], 0).await);
    good(&run(&lun, &rw10(0x34, 0, 8), &[], 0).await);
    assert_eq!(
        sense_of(&run(&lun, &rw16(0x90, BLOCKS, 1), &[], 0).await),
        (0x5, 0x21, 0)
    );
    good(&run(&lun, &[0x1b, 0, 0, 0, 1, 0], &[], 0).await);
    good(&run(&lun, &[0x1e, 0, 0, 0, 1, 0], &[], 0).await);
    let defects = run(&lun, &[0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0], &[], 32).await;
    assert_eq!(defects.data_in, [0, 0x18, 0, 0]);
}
