//! Text key=value pairs of login and text requests (RFC 7143 section 6.1).
