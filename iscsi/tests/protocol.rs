//! The target at the PDU level, from a minimal initiator written in the test: what no
//! installed initiator exercises — CRC32C data digests on every PDU (libiscsi 1.19 cannot ask
//! for them), the target's NOP-In keepalive, and a graceful stop with a command in flight.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use grove_engine::{Pool, PoolOptions};
use grove_iscsi::pdu::{op, read_pdu, Digests, Pdu, FLAG_FINAL, RESERVED_TAG};
use grove_iscsi::TargetOptions;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const TARGET: &str = "iqn.2026-11.io.grove:vol";

struct Target {
    port: u16,
    stop: watch::Sender<bool>,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start(configure: impl FnOnce(&mut TargetOptions)) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::open(PoolOptions::new(dir.path())).unwrap();
    pool.create_volume("vol", 16 << 20).await.unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = watch::channel(false);
    let mut options = TargetOptions::default().with_stop(stopped);
    configure(&mut options);
    let served = tokio::spawn(grove_iscsi::serve_tcp(pool, listener, options));
    Target {
        port,
        stop,
        served,
        _dir: dir,
    }
}

struct Initiator {
    stream: TcpStream,
    digests: Digests,
    cmd_sn: u32,
    exp_stat_sn: u32,
    next_itt: u32,
}

fn text(pairs: &[(&str, &str)]) -> Bytes {
    let mut out = Vec::new();
    for (key, value) in pairs {
        out.extend_from_slice(format!("{key}={value}\0").as_bytes());
    }
    Bytes::from(out)
}

fn pairs(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let p = String::from_utf8_lossy(p);
            let (k, v) = p.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

impl Initiator {
    /// Logs in to the operational stage and straight on to full feature phase, asking for
    /// `digest` ("CRC32C" or "None") on headers and data.
    async fn login(port: u16, digest: &str) -> Initiator {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut login = Pdu::new(op::LOGIN);
        login.set_immediate();
        login.set_flags(0x80 | (1 << 2) | 3); // T, CSG operational, NSG full feature
        login.bhs[8..14].copy_from_slice(&[0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]);
        login.set_itt(1);
        login.data = text(&[
            ("InitiatorName", "iqn.2026-11.test:protocol"),
            ("TargetName", TARGET),
            ("SessionType", "Normal"),
            ("HeaderDigest", digest),
            ("DataDigest", digest),
            ("ImmediateData", "No"),
            ("InitialR2T", "Yes"),
            ("MaxBurstLength", "16384"),
            ("MaxRecvDataSegmentLength", "4096"),
        ]);
        login
            .write_to(&mut stream, Digests::default())
            .await
            .unwrap();
        let mut reply = read_pdu(&mut stream, Digests::default(), 1 << 20)
            .await
            .unwrap()
            .unwrap();
        // The target may ask for another round to declare its own keys.
        while reply.flags() & 0x80 == 0 {
            let mut next = Pdu::new(op::LOGIN);
            next.set_immediate();
            next.set_flags(0x80 | (1 << 2) | 3);
            next.bhs[8..14].copy_from_slice(&[0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]);
            next.set_itt(1);
            next.write_to(&mut stream, Digests::default())
                .await
                .unwrap();
            reply = read_pdu(&mut stream, Digests::default(), 1 << 20)
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(reply.opcode(), op::LOGIN_RESPONSE);
        assert_eq!(reply.byte(36), 0, "login refused: {:?}", pairs(&reply.data));
        assert_eq!(reply.flags() & 0x3, 3, "not in full feature phase");
        let answered = pairs(&reply.data);
        let on = |key: &str| answered.iter().any(|(k, v)| k == key && v == "CRC32C");
        let digests = Digests {
            header: on("HeaderDigest"),
            data: on("DataDigest"),
        };
        assert_eq!(digests.header, digest == "CRC32C", "{answered:?}");
        assert_eq!(digests.data, digest == "CRC32C", "{answered:?}");
        let mut initiator = Initiator {
            stream,
            digests,
            cmd_sn: reply.u32_at(28),
            exp_stat_sn: reply.u32_at(24).wrapping_add(1),
            next_itt: 100,
        };
        // A new nexus first hears of the unit's power-on (a unit attention), as initiators
        // expect: TEST UNIT READY takes it.
        let ready = initiator.command(&[0u8; 6], 0, 0);
        initiator.send(ready).await;
        let status = initiator.recv().await.unwrap();
        assert_eq!(status.opcode(), op::SCSI_RESPONSE);
        initiator
    }

    async fn send(&mut self, mut pdu: Pdu) {
        pdu.write_to(&mut self.stream, self.digests).await.unwrap();
    }

    async fn recv(&mut self) -> Option<Pdu> {
        let pdu = read_pdu(&mut self.stream, self.digests, 1 << 20)
            .await
            .unwrap()?;
        if matches!(
            pdu.opcode(),
            op::SCSI_RESPONSE | op::NOP_IN | op::TEXT_RESPONSE | op::LOGOUT_RESPONSE
        ) && pdu.itt() != RESERVED_TAG
        {
            self.exp_stat_sn = pdu.u32_at(24).wrapping_add(1);
        }
        Some(pdu)
    }

    fn command(&mut self, cdb: &[u8], read: u32, write: u32) -> Pdu {
        let mut pdu = Pdu::new(op::SCSI_COMMAND);
        let mut flags = FLAG_FINAL;
        if read > 0 {
            flags |= 0x40;
        }
        if write > 0 {
            flags |= 0x20;
        }
        pdu.set_flags(flags | 0x01); // SIMPLE
        pdu.set_itt(self.next_itt);
        self.next_itt += 1;
        pdu.set_u32(20, read.max(write));
        pdu.set_u32(24, self.cmd_sn);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        pdu.set_u32(28, self.exp_stat_sn);
        pdu.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        pdu
    }

    /// WRITE(10) of `data` at `lba` through R2Ts (no immediate or unsolicited data).
    async fn write10(&mut self, lba: u32, data: &[u8]) {
        let blocks = (data.len() / 512) as u16;
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        let command = self.command(&cdb, 0, data.len() as u32);
        let itt = command.itt();
        self.send(command).await;
        let mut r2ts = 0;
        loop {
            let pdu = self.recv().await.expect("the target closed the connection");
            match pdu.opcode() {
                op::R2T => {
                    r2ts += 1;
                    assert_eq!(pdu.itt(), itt);
                    let (ttt, offset, len) = (pdu.u32_at(20), pdu.u32_at(40), pdu.u32_at(44));
                    assert!(len <= 16384, "R2T beyond MaxBurstLength: {len}");
                    // Data-Out in segments of at most the target's MaxRecvDataSegmentLength.
                    let mut sent = 0;
                    let mut data_sn = 0;
                    while sent < len {
                        let piece = (len - sent).min(4096);
                        let mut out = Pdu::new(op::DATA_OUT);
                        out.set_flags(if sent + piece == len { FLAG_FINAL } else { 0 });
                        out.set_itt(itt);
                        out.set_u32(20, ttt);
                        out.set_u32(28, self.exp_stat_sn);
                        out.set_u32(36, data_sn);
                        out.set_u32(40, offset + sent);
                        let at = (offset + sent) as usize;
                        out.data = Bytes::copy_from_slice(&data[at..at + piece as usize]);
                        self.send(out).await;
                        sent += piece;
                        data_sn += 1;
                    }
                }
                op::SCSI_RESPONSE => {
                    assert_eq!(pdu.itt(), itt);
                    assert_eq!(pdu.byte(3), 0, "WRITE(10) status");
                    assert!(r2ts >= data.len().div_ceil(16384), "{r2ts} R2Ts");
                    return;
                }
                other => panic!("unexpected opcode {other:#x} during a write"),
            }
        }
    }

    /// READ(10) of `blocks` at `lba`, gathered from Data-In PDUs.
    async fn read10(&mut self, lba: u32, blocks: u16) -> Vec<u8> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        let len = u32::from(blocks) * 512;
        let command = self.command(&cdb, len, 0);
        let itt = command.itt();
        self.send(command).await;
        let mut data = vec![0u8; len as usize];
        let mut next_data_sn = 0;
        loop {
            let pdu = self.recv().await.expect("the target closed the connection");
            assert_eq!(pdu.itt(), itt);
            match pdu.opcode() {
                op::DATA_IN => {
                    assert_eq!(pdu.u32_at(36), next_data_sn, "DataSN in order");
                    next_data_sn += 1;
                    assert!(
                        pdu.data.len() <= 4096,
                        "beyond our MaxRecvDataSegmentLength"
                    );
                    let at = pdu.u32_at(40) as usize;
                    data[at..at + pdu.data.len()].copy_from_slice(&pdu.data);
                    if pdu.flags() & 0x01 != 0 {
                        assert_eq!(pdu.byte(3), 0, "READ(10) status");
                        self.exp_stat_sn = pdu.u32_at(24).wrapping_add(1);
                        return data;
                    }
                }
                op::SCSI_RESPONSE => {
                    assert_eq!(pdu.byte(3), 0, "READ(10) status");
                    return data;
                }
                other => panic!("unexpected opcode {other:#x} during a read"),
            }
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn data_and_header_digests_cover_every_pdu() {
    let target = start(|_| {}).await;
    for digest in ["CRC32C", "None"] {
        let mut initiator = Initiator::login(target.port, digest).await;
        let data = pattern(64 * 1024 + 512, digest.len() as u8);
        initiator.write10(8, &data).await;
        let read = initiator.read10(8, (data.len() / 512) as u16).await;
        assert!(read == data, "data read back differs with digests {digest}");
    }
}

#[tokio::test]
async fn a_corrupt_data_digest_is_rejected_and_ends_the_connection() {
    let target = start(|_| {}).await;
    let mut initiator = Initiator::login(target.port, "CRC32C").await;
    // A NOP-Out with data, its data digest broken by hand.
    let mut nop = Pdu::new(op::NOP_OUT);
    nop.set_immediate();
    nop.set_flags(FLAG_FINAL);
    nop.set_itt(7);
    nop.set_u32(20, RESERVED_TAG);
    nop.set_u32(24, initiator.cmd_sn);
    nop.data = Bytes::from_static(b"ping");
    let header = nop.encode_header(initiator.digests);
    let mut trailer = nop.encode_trailer(initiator.digests);
    let last = trailer.len() - 1;
    trailer[last] ^= 0xff;
    use tokio::io::AsyncWriteExt;
    let mut wire = header;
    wire.extend_from_slice(&nop.data);
    wire.extend_from_slice(&trailer);
    initiator.stream.write_all(&wire).await.unwrap();
    let reply = initiator.recv().await.expect("a Reject before the close");
    assert_eq!(reply.opcode(), op::REJECT);
    assert_eq!(reply.byte(2), 0x02, "reason: data digest error");
    assert_eq!(
        &reply.data[..48],
        &wire[..48],
        "the Reject carries the header"
    );
    assert!(initiator.recv().await.is_none(), "the connection ends");
    // Others are not affected.
    let mut other = Initiator::login(target.port, "CRC32C").await;
    assert_eq!(other.read10(0, 1).await, vec![0u8; 512]);
}

#[tokio::test]
async fn idle_connections_are_pinged_and_closed_when_the_ping_goes_unanswered() {
    let target = start(|options| options.nop_interval = Duration::from_millis(200)).await;
    let mut initiator = Initiator::login(target.port, "None").await;
    // The first ping: answered, the connection stays.
    let ping = tokio::time::timeout(Duration::from_secs(5), initiator.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ping.opcode(), op::NOP_IN);
    assert_eq!(ping.itt(), RESERVED_TAG);
    let ttt = ping.u32_at(20);
    assert_ne!(ttt, RESERVED_TAG, "a ping asks for an answer");
    let mut answer = Pdu::new(op::NOP_OUT);
    answer.set_immediate();
    answer.set_flags(FLAG_FINAL);
    answer.set_itt(RESERVED_TAG);
    answer.set_u32(20, ttt);
    answer.set_u32(24, initiator.cmd_sn);
    initiator.send(answer).await;
    assert_eq!(initiator.read10(0, 1).await, vec![0u8; 512]);
    // Unanswered pings end the connection.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(pdu) = initiator.recv().await {
            assert_eq!(pdu.opcode(), op::NOP_IN);
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection stayed open without answers");
}

#[tokio::test]
async fn a_stop_answers_commands_in_flight_then_closes() {
    let target = start(|_| {}).await;
    let mut initiator = Initiator::login(target.port, "None").await;
    let data = pattern(512 * 64, 9);
    initiator.write10(0, &data).await;
    // A read in flight when the stop comes is still answered.
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[7..9].copy_from_slice(&64u16.to_be_bytes());
    let command = initiator.command(&cdb, 512 * 64, 0);
    initiator.send(command).await;
    // A ping after it: once answered, the target has taken the read (PDUs are handled in
    // order); the stop comes after that.
    let mut nop = Pdu::new(op::NOP_OUT);
    nop.set_immediate();
    nop.set_flags(FLAG_FINAL);
    nop.set_itt(9999);
    nop.set_u32(20, RESERVED_TAG);
    nop.set_u32(24, initiator.cmd_sn);
    initiator.send(nop).await;
    let mut received = Vec::new();
    let mut status = None;
    let mut pending = Vec::new();
    loop {
        let pdu = initiator.recv().await.expect("the target answers the ping");
        if pdu.opcode() == op::NOP_IN && pdu.itt() == 9999 {
            break;
        }
        pending.push(pdu);
    }
    target.stop.send(true).unwrap();
    let mut rest = Vec::new();
    while let Some(pdu) = initiator.recv().await {
        rest.push(pdu);
    }
    for pdu in pending.into_iter().chain(rest) {
        if pdu.opcode() == op::DATA_IN {
            received.extend_from_slice(&pdu.data);
            if pdu.flags() & 0x01 != 0 {
                status = Some(pdu.byte(3));
            }
        } else if pdu.opcode() == op::SCSI_RESPONSE {
            status = Some(pdu.byte(3));
        }
    }
    assert_eq!(status, Some(0), "the read in flight was answered");
    assert!(received == data);
    tokio::time::timeout(Duration::from_secs(10), target.served)
        .await
        .expect("serve_tcp returns once its sessions are closed")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn immediate_commands_cannot_get_around_the_window() {
    let target = start(|_| {}).await;
    let mut initiator = Initiator::login(target.port, "None").await;
    // 64 immediate WRITE(10)s whose data never comes (the login asked for R2Ts): they stay in
    // progress, so past the limit the rest are rejected (immediate command reject), and only
    // as many get R2Ts as may solicit data at once.
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[7..9].copy_from_slice(&1u16.to_be_bytes());
    let mut wire = Vec::new();
    for _ in 0..64 {
        let mut command = initiator.command(&cdb, 0, 512);
        command.set_immediate();
        initiator.cmd_sn = initiator.cmd_sn.wrapping_sub(1);
        command.set_u32(24, initiator.cmd_sn);
        wire.extend_from_slice(&command.encode_header(initiator.digests));
    }
    use tokio::io::AsyncWriteExt;
    initiator.stream.write_all(&wire).await.unwrap();
    let (mut r2ts, mut rejected) = (0, 0);
    while r2ts + rejected < 8 + 48 {
        let pdu = tokio::time::timeout(Duration::from_secs(10), initiator.recv())
            .await
            .expect("R2Ts and rejects come")
            .expect("the connection stays up");
        match pdu.opcode() {
            op::R2T => r2ts += 1,
            op::REJECT => {
                assert_eq!(pdu.byte(2), 0x06, "immediate command reject");
                rejected += 1;
            }
            other => panic!("unexpected opcode {other:#x}"),
        }
    }
    assert_eq!((r2ts, rejected), (8, 48));
    // Commands in the window still go through.
    assert_eq!(initiator.read10(0, 1).await, vec![0u8; 512]);
}
