//! CHAP authentication (RFC 1994 as used by RFC 7143 section 12.1.3), MD5 only.
//!
//! The response to a challenge is MD5(identifier || secret || challenge). The target sends
//! CHAP_A, CHAP_I and CHAP_C; the initiator answers with CHAP_N and CHAP_R, and for mutual
//! authentication adds its own CHAP_I and CHAP_C, which the target answers in turn.

use md5::{Digest, Md5};
use rand::Rng;

/// CHAP_A value of MD5 (RFC 1994), the only algorithm offered.
pub(crate) const ALGORITHM_MD5: &str = "5";

/// Length of an MD5 CHAP response.
pub(crate) const RESPONSE_LENGTH_BYTES: usize = 16;

/// Length of the challenges the target sends: at least as long as the response, as RFC 7143
/// section 12.1.3 asks, and the length other targets use, which every initiator accepts.
pub(crate) const CHALLENGE_LENGTH_BYTES: usize = 16;

/// Longest challenge accepted from an initiator (RFC 7143 section 12.1.3 caps CHAP_C at
/// 1024 bytes).
pub(crate) const CHALLENGE_LENGTH_MAX_BYTES: usize = 1024;

/// Secrets shorter than this are weak (RFC 7143 section 12.1.3 asks for at least 96 bits).
pub(crate) const SECRET_LENGTH_MIN_BYTES: usize = 12;

/// A challenge the target sent and keeps to check the response against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub(crate) identifier: u8,
    pub(crate) challenge: Vec<u8>,
}

impl Challenge {
    /// A fresh random identifier and challenge: never reused, so a recorded response cannot
    /// be replayed.
    pub(crate) fn random() -> Challenge {
        let mut rng = rand::thread_rng();
        let mut challenge = vec![0u8; CHALLENGE_LENGTH_BYTES];
        rng.fill(challenge.as_mut_slice());
        Challenge {
            identifier: rng.gen(),
            challenge,
        }
    }

    /// Whether `response` is the answer of someone who knows `secret`.
    pub(crate) fn verify(&self, secret: &str, response: &[u8]) -> bool {
        let expected = response_to(self.identifier, secret, &self.challenge);
        constant_time_equal(&expected, response)
    }
}

/// MD5(identifier || secret || challenge), the CHAP response (RFC 1994 section 4.1).
pub(crate) fn response_to(
    identifier: u8,
    secret: &str,
    challenge: &[u8],
) -> [u8; RESPONSE_LENGTH_BYTES] {
    let mut hasher = Md5::new();
    hasher.update([identifier]);
    hasher.update(secret.as_bytes());
    hasher.update(challenge);
    hasher.finalize().into()
}

/// Compares without an early exit, so the time taken tells nothing about how many leading
/// bytes of a guessed response were right.
fn constant_time_equal(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    left.iter()
        .zip(right)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1994_response_is_md5_of_id_secret_challenge() {
        // MD5 of the bytes 0x01 "secret" 0x02 0x03, computed by hand with a second hasher.
        let mut reference = Md5::new();
        reference.update(b"\x01secret\x02\x03");
        let expected: [u8; 16] = reference.finalize().into();
        assert_eq!(response_to(1, "secret", &[2, 3]), expected);
    }

    #[test]
    fn rfc1321_known_answer() {
        // RFC 1321 appendix A.5: MD5("abc"); here identifier 'a', secret "b", challenge "c".
        assert_eq!(
            hex::encode(response_to(b'a', "b", b"c")),
            "900150983cd24fb0d6963f7d28e17f72"
        );
    }

    #[test]
    fn random_challenges_differ_and_verify() {
        let first = Challenge::random();
        let second = Challenge::random();
        assert_eq!(first.challenge.len(), CHALLENGE_LENGTH_BYTES);
        assert_ne!(first.challenge, second.challenge);
        let response = response_to(first.identifier, "a secret of 16b", &first.challenge);
        assert!(first.verify("a secret of 16b", &response));
        assert!(!first.verify("another secret!", &response));
        assert!(!first.verify("a secret of 16b", &response[..15]));
    }
}
