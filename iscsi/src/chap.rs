//! CHAP authentication (RFC 1994 as used by RFC 7143 section 12.1.3), MD5 only.
