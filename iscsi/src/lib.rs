//! grove's iSCSI target (RFC 7143) with SCSI block commands (SBC-3, SPC-4): every ref of every
//! volume is a target with one LUN, and every command turns into a call on an engine session,
//! as in the NBD server.

mod chap;
pub mod login;
pub mod scsi;
pub mod text;
