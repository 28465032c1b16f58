//! End-to-end: hostile and malformed NBD input over raw TCP. Whatever a client sends, the
//! server answers with the error the specification prescribes or closes that connection; it
//! never hangs, never crashes, never damages stored data, and keeps serving everyone else
//! (checked afterwards with /healthz and with qemu-io reading the stored pattern).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::nbd::{self, Conn, Reaction};
use support::{assert_patterns, require_nbd_tools, write_pattern, Grove, MIB};

const VOLUME_BYTES: u64 = 64 * MIB;
const PATTERN: u8 = 0x5c;
const PATTERN_BYTES: u64 = 4 * MIB;
const REACTION_TIMEOUT: Duration = Duration::from_secs(10);

/// A server with volume `v` holding PATTERN over its first 4 MiB.
fn server() -> Grove {
    require_nbd_tools();
    let grove = Grove::start();
    grove.create_volume("v", "64MiB");
    write_pattern(&grove.unix_uri("v"), PATTERN, 0, PATTERN_BYTES);
    grove
}

/// The server survived and `v` still holds exactly what was written with qemu-io.
fn assert_intact(grove: &mut Grove) {
    grove.assert_healthy();
    assert_patterns(
        &grove.unix_uri("v"),
        &[
            (PATTERN, 0, PATTERN_BYTES),
            (0, PATTERN_BYTES, VOLUME_BYTES - PATTERN_BYTES),
        ],
    );
    // A fresh raw client gets a normal session, too.
    let (mut conn, info) = nbd::open(grove.nbd_port, "v");
    assert_eq!(info.size_bytes, VOLUME_BYTES);
    let data = conn
        .read(0, 4096)
        .expect("read on a fresh connection")
        .expect("read succeeds");
    assert!(data.iter().all(|&byte| byte == PATTERN));
    conn.disconnect();
}

/// The server must react (answer or close) rather than wait forever.
fn expect_reaction(conn: &mut Conn, what: &str) -> Reaction {
    let reaction = conn.reaction(REACTION_TIMEOUT);
    assert!(
        !matches!(reaction, Reaction::Silent),
        "after {what} the server neither answered nor closed the connection within {REACTION_TIMEOUT:?}"
    );
    reaction
}

/// The server must close the connection (it may send bytes first).
fn expect_close(conn: &mut Conn, what: &str) {
    for _ in 0..4 {
        match conn.reaction(REACTION_TIMEOUT) {
            Reaction::Closed => return,
            Reaction::Answered(_) => continue,
            Reaction::Silent => panic!(
                "after {what} the server must close the connection; it stayed open and silent for {REACTION_TIMEOUT:?}"
            ),
        }
    }
    panic!("after {what} the server kept sending data instead of closing");
}

/// If the server answered with an option reply, it must be an error reply.
fn assert_error_reply_if_answered(reaction: &Reaction, what: &str) {
    if let Reaction::Answered(bytes) = reaction {
        assert!(
            bytes.len() >= 20,
            "after {what} the server sent a truncated reply: {bytes:?}"
        );
        let magic = u64::from_be_bytes(bytes[0..8].try_into().expect("8 bytes"));
        assert_eq!(
            magic,
            nbd::OPTION_REPLY_MAGIC,
            "after {what} the answer is not an option reply: {bytes:?}"
        );
        let kind = u32::from_be_bytes(bytes[12..16].try_into().expect("4 bytes"));
        assert!(
            kind & nbd::REP_FLAG_ERROR != 0,
            "after {what} the server must reply with an error, got reply type {kind:#x}"
        );
    }
}

fn go_data(name_length_field: u32, name: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&name_length_field.to_be_bytes());
    data.extend_from_slice(name);
    data.extend_from_slice(&0u16.to_be_bytes());
    data
}

#[test]
fn handshake_garbage_and_hostile_options() {
    let mut grove = server();
    let port = grove.nbd_port;

    // Connect and leave at once, several times.
    for _ in 0..5 {
        Conn::connect(port).hang_up();
    }

    // Garbage instead of the client flags: unknown flag bits, so the server must close.
    let mut conn = Conn::connect(port);
    conn.send(&b"GARBAGE GARBAGE GARBAGE GARBAGE GARBAGE!".repeat(8))
        .expect("send garbage");
    conn.greeting();
    expect_close(&mut conn, "garbage in place of the client flags");

    // Client flags with an unknown bit.
    let mut conn = Conn::connect(port);
    conn.greeting();
    conn.send(&(0x8000_0000u32 | nbd::FLAG_C_FIXED_NEWSTYLE).to_be_bytes())
        .expect("send client flags");
    expect_close(&mut conn, "client flags with an unknown bit");

    // An option with a bad magic number.
    let mut conn = Conn::connect(port);
    conn.start_options();
    conn.send_option_raw(0x4241_444d_4147_4943, nbd::OPT_GO, 0, &[])
        .expect("send option");
    expect_reaction(&mut conn, "an option with bad magic");

    // Oversized option lengths, with no data behind them.
    for (option, length) in [
        (nbd::OPT_GO, 0xffff_fff0u32),
        (nbd::OPT_INFO, 0x7fff_ffff),
        (0x1234, 0x7fff_ffff),
        (nbd::OPT_LIST, 0x1000_0000),
    ] {
        let mut conn = Conn::connect(port);
        conn.start_options();
        conn.send_option_raw(nbd::IHAVEOPT, option, length, &[])
            .expect("send option header");
        let what = format!("option {option:#x} with length {length:#x}");
        let reaction = expect_reaction(&mut conn, &what);
        assert_error_reply_if_answered(&reaction, &what);
    }

    // NBD_OPT_GO whose name length points past the option data.
    let mut conn = Conn::connect(port);
    conn.start_options();
    let data = go_data(1000, b"v");
    conn.send_option(nbd::OPT_GO, &data);
    let reaction = expect_reaction(&mut conn, "NBD_OPT_GO with an inconsistent name length");
    assert_error_reply_if_answered(&reaction, "NBD_OPT_GO with an inconsistent name length");

    // An export name longer than the 4096 bytes the specification allows.
    let mut conn = Conn::connect(port);
    conn.start_options();
    let long_name = vec![b'a'; 5000];
    let data = go_data(long_name.len() as u32, &long_name);
    conn.send_option(nbd::OPT_GO, &data);
    let reaction = expect_reaction(&mut conn, "NBD_OPT_GO with a 5000-byte name");
    assert_error_reply_if_answered(&reaction, "NBD_OPT_GO with a 5000-byte name");

    // Half an option header, then gone.
    let mut conn = Conn::connect(port);
    conn.start_options();
    conn.send(&nbd::IHAVEOPT.to_be_bytes()).expect("send");
    conn.hang_up();

    // Half an option's data, then gone.
    let mut conn = Conn::connect(port);
    conn.start_options();
    conn.send_option_raw(nbd::IHAVEOPT, nbd::OPT_GO, 100, &[0u8; 10])
        .expect("send");
    conn.hang_up();

    assert_intact(&mut grove);
}

#[test]
fn unknown_options_and_exports_keep_the_session_going() {
    let mut grove = server();
    let port = grove.nbd_port;

    let mut conn = Conn::connect(port);
    conn.start_options();
    // An unknown option gets NBD_REP_ERR_UNSUP, naming the option, and haggling goes on.
    conn.send_option(0x1234, b"abc");
    let reply = conn.option_reply().expect("reply to an unknown option");
    assert_eq!(reply.option, 0x1234, "the reply names the unknown option");
    assert_eq!(
        reply.kind,
        nbd::REP_ERR_UNSUP,
        "an unknown option must get NBD_REP_ERR_UNSUP"
    );
    // Unknown exports are errors, not disconnects.
    for name in ["nope", "v@no-such-branch", "Bad Name!", "v@", "@main", ""] {
        let reply = conn
            .go(name)
            .expect_err("NBD_OPT_GO on a missing export must fail");
        assert!(
            reply.is_error(),
            "export {name:?}: expected an error reply, got {reply:?}"
        );
    }
    // NBD_OPT_INFO on a real export, then NBD_OPT_GO.
    let mut data = Vec::new();
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(b"v");
    data.extend_from_slice(&0u16.to_be_bytes());
    conn.send_option(nbd::OPT_INFO, &data);
    let mut saw_export_info = false;
    loop {
        let reply = conn.option_reply().expect("reply to NBD_OPT_INFO");
        assert_eq!(reply.option, nbd::OPT_INFO);
        assert!(!reply.is_error(), "NBD_OPT_INFO on v failed: {reply:?}");
        if reply.kind == nbd::REP_INFO && reply.data.len() == 12 && reply.data[..2] == [0, 0] {
            let size = u64::from_be_bytes(reply.data[2..10].try_into().expect("8 bytes"));
            assert_eq!(size, VOLUME_BYTES, "NBD_INFO_EXPORT size");
            saw_export_info = true;
        }
        if reply.kind == nbd::REP_ACK {
            break;
        }
    }
    assert!(saw_export_info, "NBD_OPT_INFO must send NBD_INFO_EXPORT");
    let info = conn.go("v").expect("NBD_OPT_GO on v after errors");
    assert_eq!(info.size_bytes, VOLUME_BYTES);
    assert!(!info.read_only(), "v is writable");
    let data = conn.read(0, 4096).expect("read").expect("read succeeds");
    assert!(data.iter().all(|&byte| byte == PATTERN), "v reads its data");
    conn.disconnect();

    // The old way in: NBD_OPT_EXPORT_NAME.
    let mut conn = Conn::connect(port);
    let flags = conn.start_options();
    conn.send_option(nbd::OPT_EXPORT_NAME, b"v");
    let size_bytes = u64::from_be_bytes(
        conn.recv_exact(8)
            .expect("export size")
            .try_into()
            .expect("8 bytes"),
    );
    assert_eq!(size_bytes, VOLUME_BYTES, "NBD_OPT_EXPORT_NAME export size");
    let transmission = conn.recv_exact(2).expect("transmission flags");
    assert!(
        transmission[1] & (nbd::TFLAG_HAS_FLAGS as u8) != 0,
        "NBD_FLAG_HAS_FLAGS"
    );
    if flags & nbd::FLAG_NO_ZEROES == 0 {
        conn.recv_exact(124).expect("124 zero bytes");
    }
    let data = conn.read(4096, 4096).expect("read").expect("read succeeds");
    assert!(data.iter().all(|&byte| byte == PATTERN));
    conn.disconnect();

    // NBD_OPT_ABORT ends the session cleanly.
    let mut conn = Conn::connect(port);
    conn.start_options();
    conn.send_option(nbd::OPT_ABORT, &[]);
    expect_reaction(&mut conn, "NBD_OPT_ABORT");

    assert_intact(&mut grove);
}

#[test]
fn bad_requests_in_transmission() {
    let mut grove = server();
    let port = grove.nbd_port;
    let last_block = VOLUME_BYTES - 4096;

    // Reads past the end: EINVAL.
    for (offset, length) in [
        (last_block, 8192u32),
        (VOLUME_BYTES, 4096),
        (VOLUME_BYTES * 4, 1),
    ] {
        let (mut conn, _) = nbd::open(port, "v");
        let result = conn.read(offset, length).unwrap_or_else(|error| {
            panic!("no reply to a read past the end at {offset}+{length}: {error}")
        });
        assert_eq!(
            result.err(),
            Some(nbd::EINVAL),
            "a read past the end at {offset}+{length} must fail with EINVAL"
        );
    }

    // A read whose offset + length overflows 64 bits.
    let (mut conn, _) = nbd::open(port, "v");
    // A hard disconnect is acceptable; a reply must be an error.
    if let Ok(result) = conn.read(u64::MAX - 1023, 4096) {
        assert!(
            result.is_err(),
            "a read at offset 2^64-1024 must fail, not return data"
        );
    }

    // A write past the end fails (ENOSPC per the specification) and writes nothing in range.
    let (mut conn, _) = nbd::open(port, "v");
    let error = conn
        .write(last_block, &vec![0xee; 8192], 0)
        .expect("reply to a write past the end");
    assert!(
        error == nbd::ENOSPC || error == nbd::EINVAL,
        "a write past the end must fail with ENOSPC (or EINVAL), got {error}"
    );
    // A trim past the end fails, too.
    let (mut conn, _) = nbd::open(port, "v");
    let error = conn
        .command(nbd::CMD_TRIM, 0, last_block, 8192)
        .expect("reply to a trim past the end");
    assert_ne!(error, 0, "a trim past the end must fail");

    // An unknown command: EINVAL (or a hard disconnect).
    let (mut conn, _) = nbd::open(port, "v");
    if let Ok(error) = conn.command(99, 0, 0, 4096) {
        assert_eq!(
            error,
            nbd::EINVAL,
            "an unknown command must fail with EINVAL"
        );
    }
    // A known command with an unknown flag: EINVAL (or a hard disconnect).
    let (mut conn, _) = nbd::open(port, "v");
    if let Ok(error) = conn.command(nbd::CMD_FLUSH, 0x4000, 0, 0) {
        assert_eq!(
            error,
            nbd::EINVAL,
            "an unknown command flag must fail with EINVAL"
        );
    }

    // A zero-length read and write: any reply, no hang.
    let (mut conn, _) = nbd::open(port, "v");
    conn.send_request(nbd::REQUEST_MAGIC, 0, nbd::CMD_READ, 0, 0, &[])
        .expect("send zero-length read");
    expect_reaction(&mut conn, "a zero-length read");
    let (mut conn, _) = nbd::open(port, "v");
    conn.send_request(nbd::REQUEST_MAGIC, 0, nbd::CMD_WRITE, 0, 0, &[])
        .expect("send zero-length write");
    expect_reaction(&mut conn, "a zero-length write");

    // A request with bad magic: the stream cannot be trusted any more.
    let (mut conn, _) = nbd::open(port, "v");
    conn.send_request(0xdead_beef, 0, nbd::CMD_READ, 0, 4096, &[])
        .expect("send bad request");
    expect_reaction(&mut conn, "a request with bad magic");

    // Absurd lengths whose payload never comes, and an absurd read.
    let (mut conn, _) = nbd::open(port, "v");
    conn.send_request(nbd::REQUEST_MAGIC, 0, nbd::CMD_WRITE, 0, 0x7fff_f000, &[])
        .expect("send huge write header");
    expect_reaction(&mut conn, "a 2 GiB write header with no payload");
    let (mut conn, _) = nbd::open(port, "v");
    conn.send_request(nbd::REQUEST_MAGIC, 0, nbd::CMD_READ, 0, 0xffff_ffff, &[])
        .expect("send huge read");
    expect_reaction(&mut conn, "a 4 GiB read");

    // Abrupt disconnects: mid-header, mid-payload, and with replies still queued.
    let (mut conn, _) = nbd::open(port, "v");
    conn.send(&nbd::REQUEST_MAGIC.to_be_bytes()).expect("send");
    conn.send(&[0u8; 6]).expect("send");
    conn.hang_up();
    let (mut conn, _) = nbd::open(port, "v");
    conn.send_request(
        nbd::REQUEST_MAGIC,
        0,
        nbd::CMD_WRITE,
        0,
        MIB as u32,
        &[0xee; 1000],
    )
    .expect("send partial write");
    conn.hang_up();
    let (mut conn, _) = nbd::open(port, "v");
    for index in 0..64u64 {
        conn.send_request(
            nbd::REQUEST_MAGIC,
            0,
            nbd::CMD_READ,
            index * 65536,
            65536,
            &[],
        )
        .expect("send pipelined read");
    }
    conn.hang_up();
    let (mut conn, _) = nbd::open(port, "v");
    for index in 0..16u64 {
        conn.send_request(
            nbd::REQUEST_MAGIC,
            0,
            nbd::CMD_WRITE,
            PATTERN_BYTES + index * 4096,
            4096,
            &[PATTERN; 4096],
        )
        .expect("send pipelined write");
    }
    conn.send_request(
        nbd::REQUEST_MAGIC,
        0,
        nbd::CMD_WRITE,
        2 * PATTERN_BYTES,
        4096,
        &[0xee; 100],
    )
    .expect("send partial write");
    let writer = conn.hang_up();
    // The complete pipelined writes may or may not have landed; once the server has finished
    // with them, put the area back to zero so the final check is exact, and make sure the
    // partial one did not land.
    grove.wait_session_closed(&writer);
    let (mut conn, _) = nbd::open(port, "v");
    let zeroed = conn
        .command(nbd::CMD_WRITE_ZEROES, 0, PATTERN_BYTES, 16 * 4096)
        .expect("write zeroes");
    assert_eq!(zeroed, 0, "NBD_CMD_WRITE_ZEROES on v must succeed");
    let tail = conn
        .read(2 * PATTERN_BYTES, 4096)
        .expect("read")
        .expect("read succeeds");
    assert!(
        tail.iter().all(|&byte| byte == 0),
        "a write whose payload never fully arrived must not be applied"
    );
    conn.disconnect();

    assert_intact(&mut grove);
}

#[test]
fn unaligned_requests_and_read_only_exports() {
    let mut grove = server();
    let port = grove.nbd_port;
    let commit = grove.commit("v", "protected");

    // Sub-block and block-straddling writes through the protocol.
    let (mut conn, info) = nbd::open(port, "v");
    assert!(info.flags & nbd::TFLAG_SEND_TRIM != 0, "NBD_FLAG_SEND_TRIM");
    assert!(
        info.flags & nbd::TFLAG_SEND_WRITE_ZEROES != 0,
        "NBD_FLAG_SEND_WRITE_ZEROES"
    );
    let error = conn
        .write(PATTERN_BYTES + 4095, &[0x71, 0x72], 0)
        .expect("unaligned write");
    assert_eq!(
        error, 0,
        "a 2-byte write straddling a block boundary must succeed"
    );
    let data = conn
        .read(PATTERN_BYTES + 4094, 4)
        .expect("read")
        .expect("unaligned read succeeds");
    assert_eq!(data, vec![0, 0x71, 0x72, 0]);
    let error = conn
        .write(PATTERN_BYTES + 4095, &[0, 0], 0)
        .expect("unaligned write");
    assert_eq!(error, 0);
    conn.disconnect();

    // The commit is read-only: EPERM for writes, and reads still work on the same session.
    let export = format!("v@{commit}");
    let (mut conn, info) = nbd::open(port, &export);
    assert!(info.read_only(), "{export} must be read-only");
    assert_eq!(
        conn.write(0, &[0xee; 4096], 0).expect("reply"),
        nbd::EPERM,
        "a write to a commit must fail with EPERM"
    );
    assert_eq!(
        conn.write(0, &[0xee; 4096], nbd::CMD_FLAG_FUA)
            .expect("reply"),
        nbd::EPERM,
        "a FUA write to a commit must fail with EPERM"
    );
    assert_eq!(
        conn.command(nbd::CMD_TRIM, 0, 0, 4096).expect("reply"),
        nbd::EPERM,
        "a trim on a commit must fail with EPERM"
    );
    let data = conn
        .read(0, 4096)
        .expect("read")
        .expect("reading a commit succeeds");
    assert!(data.iter().all(|&byte| byte == PATTERN));
    conn.disconnect();
    assert_patterns(&grove.unix_uri(&export), &[(PATTERN, 0, PATTERN_BYTES)]);

    assert_intact(&mut grove);
}

#[test]
fn pipelined_requests_disconnect_cache_and_zero_flags() {
    let mut grove = server();
    let port = grove.nbd_port;
    let base = PATTERN_BYTES;

    // 32 writes sent back to back, then their replies in whatever order the server chooses.
    let (mut conn, info) = nbd::open(port, "v");
    let mut pending = BTreeMap::new();
    for index in 0..32u64 {
        let payload = vec![0x80 + index as u8; 4096];
        let handle = conn
            .send_request(
                nbd::REQUEST_MAGIC,
                0,
                nbd::CMD_WRITE,
                base + index * 4096,
                4096,
                &payload,
            )
            .expect("send pipelined write");
        pending.insert(handle, index);
    }
    while !pending.is_empty() {
        let (error, handle) = conn.any_simple_reply().expect("reply to a pipelined write");
        assert_eq!(error, 0, "pipelined write failed");
        assert!(
            pending.remove(&handle).is_some(),
            "reply with an unknown or repeated handle {handle}"
        );
    }
    // 32 reads back to back; each reply carries its handle and 4 KiB of data.
    let mut pending = BTreeMap::new();
    for index in 0..32u64 {
        let handle = conn
            .send_request(
                nbd::REQUEST_MAGIC,
                0,
                nbd::CMD_READ,
                base + index * 4096,
                4096,
                &[],
            )
            .expect("send pipelined read");
        pending.insert(handle, index);
    }
    while !pending.is_empty() {
        let (error, handle) = conn.any_simple_reply().expect("reply to a pipelined read");
        assert_eq!(error, 0, "pipelined read failed");
        let index = pending
            .remove(&handle)
            .unwrap_or_else(|| panic!("reply with an unknown or repeated handle {handle}"));
        let data = conn.recv_exact(4096).expect("read payload");
        assert!(
            data.iter().all(|&byte| byte == 0x80 + index as u8),
            "pipelined read {index} returned the wrong data"
        );
    }

    // NBD_CMD_CACHE, when advertised, succeeds; past the end it fails.
    if info.flags & nbd::TFLAG_SEND_CACHE != 0 {
        assert_eq!(
            conn.command(nbd::CMD_CACHE, 0, 0, 65536).expect("cache"),
            0,
            "NBD_CMD_CACHE on a valid range"
        );
    }
    // WRITE_ZEROES with NO_HOLE reads back as zeros; with FAST_ZERO it is done or refused
    // with ENOTSUP, never half done.
    assert_eq!(
        conn.command(nbd::CMD_WRITE_ZEROES, nbd::CMD_FLAG_NO_HOLE, base, 8192)
            .expect("write zeroes"),
        0,
        "NBD_CMD_WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE"
    );
    let zeroes = conn.read(base, 8192).expect("read").expect("read succeeds");
    assert!(zeroes.iter().all(|&byte| byte == 0));
    if info.flags & nbd::TFLAG_SEND_FAST_ZERO != 0 {
        let error = conn
            .command(
                nbd::CMD_WRITE_ZEROES,
                nbd::CMD_FLAG_FAST_ZERO,
                base + 8192,
                8192,
            )
            .expect("fast zero");
        let data = conn
            .read(base + 8192, 8192)
            .expect("read")
            .expect("read succeeds");
        match error {
            0 => assert!(data.iter().all(|&byte| byte == 0), "fast zero not applied"),
            nbd::ENOTSUP => assert!(
                data[..4096].iter().all(|&byte| byte == 0x82)
                    && data[4096..].iter().all(|&byte| byte == 0x83),
                "a refused fast zero must change nothing"
            ),
            other => panic!("NBD_CMD_FLAG_FAST_ZERO: expected 0 or ENOTSUP, got {other}"),
        }
    }
    // Put the area back to zeros for the final check.
    assert_eq!(
        conn.command(nbd::CMD_WRITE_ZEROES, 0, base, 32 * 4096)
            .expect("write zeroes"),
        0
    );
    conn.disconnect();

    // Writes still in flight when the client sends NBD_CMD_DISC must all be handled: the
    // server answers each of them, then closes. (The client reads every reply before it
    // closes its socket; closing with unread data would reset the connection and discard
    // requests the server has not read yet.)
    let (mut conn, _) = nbd::open(port, "v");
    let mut pending = BTreeMap::new();
    for index in 0..16u64 {
        let handle = conn
            .send_request(
                nbd::REQUEST_MAGIC,
                0,
                nbd::CMD_WRITE,
                8 * MIB + index * 65536,
                65536,
                &vec![0x90 + index as u8; 65536],
            )
            .expect("send write");
        pending.insert(handle, index);
    }
    conn.send_request(nbd::REQUEST_MAGIC, 0, nbd::CMD_DISC, 0, 0, &[])
        .expect("send NBD_CMD_DISC");
    conn.shutdown_write();
    while !pending.is_empty() {
        let (error, handle) = conn
            .any_simple_reply()
            .expect("every write sent before NBD_CMD_DISC gets its reply");
        assert_eq!(error, 0, "a write sent before NBD_CMD_DISC failed");
        assert!(pending.remove(&handle).is_some(), "unknown handle {handle}");
    }
    assert!(
        matches!(conn.reaction(REACTION_TIMEOUT), Reaction::Closed),
        "after NBD_CMD_DISC the server must close the connection"
    );
    let ranges: Vec<(u8, u64, u64)> = (0..16u64)
        .map(|index| (0x90 + index as u8, 8 * MIB + index * 65536, 65536))
        .collect();
    assert_patterns(&grove.unix_uri("v"), &ranges);
    let (mut conn, _) = nbd::open(port, "v");
    assert_eq!(
        conn.command(nbd::CMD_WRITE_ZEROES, 0, 8 * MIB, MIB as u32)
            .expect("write zeroes"),
        0
    );
    conn.disconnect();

    assert_intact(&mut grove);
}
