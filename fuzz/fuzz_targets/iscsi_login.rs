//! iSCSI login negotiation (`grove_iscsi::login::Login::step`) driven by a sequence of Login
//! Requests decoded from the input, with and without CHAP; and the text key parser
//! (`grove_iscsi::text::parse_pairs`) on each request's text.
//!
//! Input layout: one byte choosing the configuration (bits 0-1: no CHAP, CHAP, mutual CHAP),
//! then requests, each a 5-byte header and its text:
//! `flags (T C CSG NSG, as in the PDU) | versions (max in the high nibble, min in the low) |
//! misc (bit 0: another ISID, bit 1: a non-zero TSIH) | text length u16 LE | text`.
//!
//! So that the fuzzer can get past authentication, the harness answers the target's last
//! challenge itself: a text holding `CHAP_R=auto` gets the right response in its place.

#![no_main]

use std::sync::Arc;

use grove_iscsi::login::{
    ChapConfig, Login, LoginConfig, LoginRequest, TargetDirectory, LOGIN_PAIRS_MAX as PAIRS_MAX,
};
use grove_iscsi::text::parse_pairs;
use libfuzzer_sys::fuzz_target;
use md5::{Digest, Md5};

/// Requests handled per input; a real connection's login is bounded by its timeout.
const REQUESTS_MAX: usize = 64;
const USER: &str = "initiator-user";
const SECRET: &str = "initiator-secret-0123";
const TARGET_SECRET: &str = "target-secret-456789";

struct Targets;

impl TargetDirectory for Targets {
    fn exists(&self, target_name: &str) -> bool {
        matches!(
            target_name,
            "iqn.2026-11.io.grove:disk" | "iqn.2026-11.io.grove:disk.snap"
        )
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, mut rest)) = data.split_first() else {
        return;
    };
    let chap = match control & 3 {
        1 => Some(ChapConfig {
            user: USER.to_string(),
            secret: SECRET.to_string(),
            mutual: None,
        }),
        2 => Some(ChapConfig {
            user: USER.to_string(),
            secret: SECRET.to_string(),
            mutual: Some(("target-user".to_string(), TARGET_SECRET.to_string())),
        }),
        _ => None,
    };
    let config = Arc::new(LoginConfig {
        chap,
        max_recv_data_segment_length: 256 * 1024,
        max_burst_length: 1024 * 1024,
        first_burst_length: 256 * 1024,
        max_outstanding_r2t: 1,
    });
    let mut login = Login::new(config, 7);
    let mut challenge: Option<(u8, Vec<u8>)> = None;
    for _ in 0..REQUESTS_MAX {
        if rest.len() < 5 {
            break;
        }
        let (header, tail) = rest.split_at(5);
        let len = usize::from(u16::from_le_bytes([header[3], header[4]])).min(tail.len());
        let (raw_text, tail) = tail.split_at(len);
        rest = tail;
        let text = answer_challenge(raw_text, challenge.as_ref());
        let _ = parse_pairs(&text, PAIRS_MAX);
        let flags = header[0];
        let request = LoginRequest {
            transit: flags & 0x80 != 0,
            cont: flags & 0x40 != 0,
            csg: (flags >> 2) & 0x3,
            nsg: flags & 0x3,
            version_max: header[1] >> 4,
            version_min: header[1] & 0xf,
            isid: if header[2] & 1 != 0 {
                [0x80, 0, 0, 1, 0, 1]
            } else {
                [0x80, 0, 0, 1, 0, 0]
            },
            tsih: if header[2] & 2 != 0 { 7 } else { 0 },
            text: &text,
        };
        let reply = login.step(&request, &Targets);
        if let Some(sent) = challenge_in(&reply.text) {
            challenge = Some(sent);
        }
        if reply.status_class != 0 {
            break;
        }
        if let Some(negotiated) = login.negotiated() {
            // The connection sizes its buffers from these: they must be the bounded ones.
            assert!(negotiated.params.target_max_recv_data_segment_length <= 256 * 1024);
            break;
        }
    }
});

/// The target's CHAP_I and CHAP_C in a reply, if it sent a challenge.
fn challenge_in(text: &[u8]) -> Option<(u8, Vec<u8>)> {
    let pairs = parse_pairs(text, PAIRS_MAX).ok()?;
    let identifier = pairs.iter().find(|(k, _)| *k == "CHAP_I")?.1.parse().ok()?;
    let challenge = pairs.iter().find(|(k, _)| *k == "CHAP_C")?.1;
    let challenge = grove_iscsi::text::decode_binary(challenge)?;
    Some((identifier, challenge))
}

/// `text` with `CHAP_R=auto` replaced by the right response to `challenge`.
fn answer_challenge(text: &[u8], challenge: Option<&(u8, Vec<u8>)>) -> Vec<u8> {
    const AUTO: &[u8] = b"CHAP_R=auto";
    let Some((identifier, challenge)) = challenge else {
        return text.to_vec();
    };
    let Some(at) = text.windows(AUTO.len()).position(|w| w == AUTO) else {
        return text.to_vec();
    };
    let mut hasher = Md5::new();
    hasher.update([*identifier]);
    hasher.update(SECRET.as_bytes());
    hasher.update(challenge);
    let response: [u8; 16] = hasher.finalize().into();
    let mut out = text[..at].to_vec();
    out.extend_from_slice(b"CHAP_R=");
    out.extend_from_slice(grove_iscsi::text::encode_hex(&response).as_bytes());
    out.extend_from_slice(&text[at + AUTO.len()..]);
    out
}
