//! NBD wire constants, message layouts, decoders and encoders.
//!
//! Everything here follows `doc/proto.md` of the NetworkBlockDevice/nbd project ("the spec"),
//! and its `extension-ext-header` branch for extended headers. Sections used:
//!
//! - "Newstyle negotiation" and "Fixed newstyle negotiation": the greeting, option headers and
//!   option replies ([`NBDMAGIC`], [`IHAVEOPT`], [`OPTION_REPLY_MAGIC`]).
//! - "Values / Handshake phase": handshake, client and transmission flags, option types,
//!   option reply types and `NBD_INFO_*` information types.
//! - "Transmission / Request message": the compact (28-byte) and extended (32-byte) request
//!   headers ([`RequestHeader`]).
//! - "Simple reply message", "Structured reply chunk message", "Extended reply chunk
//!   message": the three reply headers.
//! - "Values / Transmission phase": command flags, reply flags, structured reply types and
//!   error values.
//! - "Size constraints": [`PAYLOAD_MAX_BYTES`] and the advertised block sizes.
//! - "Metadata querying" and "The `base:` metadata namespace": [`BASE_ALLOCATION`] and its
//!   `NBD_STATE_*` flags.
//! - QEMU's `docs/interop/nbd.rst`, "`qemu` namespace": the `qemu:dirty-bitmap:` contexts
//!   and [`NBD_STATE_DIRTY`].
//!
//! Metadata contexts this server offers, and the query strings it reads ([`MetaQuery`]):
//!
//! | context | flags of each extent |
//! |---------|----------------------|
//! | `base:allocation` | [`NBD_STATE_HOLE`], [`NBD_STATE_ZERO`] (the spec's) |
//! | `grove:diff:REF` | bit 0 ([`GROVE_STATE_CHANGED`]): the extent differs between the export and `REF` |
//! | `qemu:dirty-bitmap:REF` | bit 0 ([`NBD_STATE_DIRTY`]): the same, in QEMU's terms (dirty = differs) |
//!
//! `REF` is a ref of the export's volume (a bare branch, tag or commit name, or a full
//! `VOL@NAME`; refs of a volume sharing history with it, such as its clone source, work
//! too). Both diff contexts answer the same question: which 4 KiB blocks of the export map
//! differently from `REF`, the comparison `grove diff` makes. Everything else in the flags is
//! zero. The wildcards `grove:`, `grove:diff:`, `qemu:` and `qemu:dirty-bitmap:` list the
//! refs a client can name; they select nothing.
//!
//! All integers are big-endian. Decoders never panic: short input, trailing bytes and bad
//! strings are [`ParseError`]s, and unknown option or command codes decode to an
//! `Unsupported(code)` variant so the caller can answer them.

use std::fmt;

// ---------------------------------------------------------------------------------------------
// Handshake ("Newstyle negotiation", "Fixed newstyle negotiation").

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the second 8 bytes of the greeting, and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (16 bits, server to client).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flags (32 bits, client to server).
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands; any other bit closes the connection.
pub const CLIENT_FLAGS_KNOWN: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

/// Transmission flags (16 bits, sent with the export size).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
pub const NBD_FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

/// Option codes ("Option types").
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types ("Option reply types"). Errors have bit 31 set.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = NBD_REP_FLAG_ERROR | 10;

/// Information types of `NBD_REP_INFO` ("`NBD_REP_INFO` (3)").
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// The zero padding after an `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_REPLY_PADDING_BYTES: usize = 124;

// ---------------------------------------------------------------------------------------------
// Transmission ("Request message", reply messages, "Transmission phase" values).

pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Size of a compact request header: magic, flags, type, cookie, offset, 32-bit length.
pub const REQUEST_HEADER_COMPACT_BYTES: usize = 28;
/// Size of an extended request header: as compact, with a 64-bit length.
pub const REQUEST_HEADER_EXTENDED_BYTES: usize = 32;
pub const SIMPLE_REPLY_BYTES: usize = 16;
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;
pub const EXTENDED_REPLY_HEADER_BYTES: usize = 32;

/// Command types ("Request types").
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

/// Command flags ("Command flags").
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Reply flags ("Structured and extended header reply flags").
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

/// Structured reply types ("Structured reply types"). Error types have bit 15 set.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// Error values ("Error values"). Only these may go on the wire.
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------------------------
// Metadata contexts ("The `base:` metadata namespace"; QEMU's "`qemu` namespace"; grove's own).

/// The spec's allocation context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The `base:` namespace query, a wildcard for `NBD_OPT_LIST_META_CONTEXT`.
pub const BASE_NAMESPACE: &str = "base:";
/// `base:allocation` flag: no storage backs the extent.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeros.
pub const NBD_STATE_ZERO: u32 = 1 << 1;

/// The `grove:` namespace query, a wildcard for `NBD_OPT_LIST_META_CONTEXT`.
pub const GROVE_NAMESPACE: &str = "grove:";
/// The prefix of `grove:diff:REF`; alone, a wildcard for `NBD_OPT_LIST_META_CONTEXT`.
pub const GROVE_DIFF_PREFIX: &str = "grove:diff:";
/// `grove:diff:REF` flag: the extent differs between the export and `REF`.
pub const GROVE_STATE_CHANGED: u32 = 1 << 0;
/// The `qemu:` namespace query, a wildcard for `NBD_OPT_LIST_META_CONTEXT`.
pub const QEMU_NAMESPACE: &str = "qemu:";
/// The prefix of `qemu:dirty-bitmap:REF`; alone, a wildcard for `NBD_OPT_LIST_META_CONTEXT`.
pub const QEMU_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
/// `qemu:dirty-bitmap:` flag (QEMU's `NBD_STATE_DIRTY`): the extent is dirty, here meaning it
/// differs between the export and `REF`.
pub const NBD_STATE_DIRTY: u32 = 1 << 0;

/// The two names under which the differences from a ref are offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DiffNamespace {
    /// `grove:diff:REF`.
    Grove,
    /// `qemu:dirty-bitmap:REF`, for clients built on QEMU's dirty-bitmap interface.
    Qemu,
}

impl DiffNamespace {
    pub const ALL: [DiffNamespace; 2] = [DiffNamespace::Grove, DiffNamespace::Qemu];

    /// The context name up to the ref.
    pub fn prefix(self) -> &'static str {
        match self {
            DiffNamespace::Grove => GROVE_DIFF_PREFIX,
            DiffNamespace::Qemu => QEMU_DIRTY_BITMAP_PREFIX,
        }
    }

    /// The flag set on extents that differ (bit 0 in both namespaces).
    pub fn changed_flag(self) -> u32 {
        match self {
            DiffNamespace::Grove => GROVE_STATE_CHANGED,
            DiffNamespace::Qemu => NBD_STATE_DIRTY,
        }
    }

    /// The full context name for `reference`.
    pub fn context_name(self, reference: &str) -> String {
        format!("{}{reference}", self.prefix())
    }
}

/// A metadata context query (`NBD_OPT_LIST_META_CONTEXT`, `NBD_OPT_SET_META_CONTEXT`) as
/// this server reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaQuery<'a> {
    /// `base:allocation`.
    BaseAllocation,
    /// `base:`: lists every `base:` context; selects nothing.
    BaseWildcard,
    /// `grove:`, `grove:diff:`, `qemu:` or `qemu:dirty-bitmap:`: lists the diff contexts of
    /// that namespace; selects nothing.
    DiffWildcard(DiffNamespace),
    /// `grove:diff:REF` or `qemu:dirty-bitmap:REF` with a non-empty `REF`.
    Diff(DiffNamespace, &'a str),
    /// Anything else: an unknown namespace or an unknown leaf of a known one. The spec has the
    /// server ignore these.
    Ignored,
}

impl<'a> MetaQuery<'a> {
    pub fn parse(query: &'a str) -> Self {
        if query == BASE_ALLOCATION {
            return MetaQuery::BaseAllocation;
        }
        if query == BASE_NAMESPACE {
            return MetaQuery::BaseWildcard;
        }
        for namespace in DiffNamespace::ALL {
            let namespace_only = match namespace {
                DiffNamespace::Grove => GROVE_NAMESPACE,
                DiffNamespace::Qemu => QEMU_NAMESPACE,
            };
            if query == namespace_only {
                return MetaQuery::DiffWildcard(namespace);
            }
            if let Some(reference) = query.strip_prefix(namespace.prefix()) {
                if reference.is_empty() {
                    return MetaQuery::DiffWildcard(namespace);
                }
                return MetaQuery::Diff(namespace, reference);
            }
        }
        MetaQuery::Ignored
    }
}

// ---------------------------------------------------------------------------------------------
// Limits ("Conventions", "Size constraints").

/// Longest string (export name, description, error message, query) on the wire.
pub const STRING_MAX_BYTES: usize = 4096;
/// Longest option data this server reads. Real options are a few hundred bytes; a longer one
/// is treated as a denial of service and the connection is closed.
pub const OPTION_DATA_MAX_BYTES: u32 = 64 * 1024;
/// Advertised minimum block size: any alignment works (the engine read-modify-writes).
pub const BLOCK_SIZE_MIN_BYTES: u32 = 1;
/// Advertised preferred block size: the engine's 4 KiB block.
pub const BLOCK_SIZE_PREFERRED_BYTES: u32 = 4096;
/// Largest READ or WRITE payload (the spec's default maximum payload, 2^25 bytes).
pub const PAYLOAD_MAX_BYTES: u32 = 32 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Decoding helpers.

/// Why a message from the client could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("message is shorter than its fields say")]
    Short,
    #[error("message has {0} bytes after its last field")]
    Trailing(usize),
    #[error("string is longer than {STRING_MAX_BYTES} bytes")]
    StringTooLong,
    #[error("string is not valid UTF-8 or contains NUL")]
    StringInvalid,
}

/// A cursor over a received message that fails on short input and, at [`ByteReader::finish`],
/// on trailing bytes.
pub struct ByteReader<'a> {
    bytes: &'a [u8],
}

impl<'a> ByteReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        ByteReader { bytes }
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    pub fn take(&mut self, len: usize) -> Result<&'a [u8], ParseError> {
        if len > self.bytes.len() {
            return Err(ParseError::Short);
        }
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ParseError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub fn u16(&mut self) -> Result<u16, ParseError> {
        self.array().map(u16::from_be_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, ParseError> {
        self.array().map(u32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, ParseError> {
        self.array().map(u64::from_be_bytes)
    }

    /// A string of `len` bytes, checked against the spec's rules for strings.
    pub fn string(&mut self, len: u32) -> Result<String, ParseError> {
        let len = usize::try_from(len).map_err(|_| ParseError::Short)?;
        if len > STRING_MAX_BYTES {
            // Still a length error first if the bytes are not even there.
            if len > self.bytes.len() {
                return Err(ParseError::Short);
            }
            return Err(ParseError::StringTooLong);
        }
        parse_string(self.take(len)?)
    }

    /// Ends decoding; fails if bytes are left over.
    pub fn finish(self) -> Result<(), ParseError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(ParseError::Trailing(self.bytes.len()))
        }
    }
}

/// Checks a wire string: UTF-8, no NUL, at most [`STRING_MAX_BYTES`].
pub fn parse_string(bytes: &[u8]) -> Result<String, ParseError> {
    if bytes.len() > STRING_MAX_BYTES {
        return Err(ParseError::StringTooLong);
    }
    if bytes.contains(&0) {
        return Err(ParseError::StringInvalid);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| ParseError::StringInvalid)
}

/// Cuts a string to at most [`STRING_MAX_BYTES`] on a character boundary, for strings this
/// server sends (descriptions, error messages).
pub fn truncate_string(text: &str) -> &str {
    if text.len() <= STRING_MAX_BYTES {
        return text;
    }
    let mut end = STRING_MAX_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

// ---------------------------------------------------------------------------------------------
// Options.

/// An option code as the client sent it ("Option types").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionCode {
    ExportName,
    Abort,
    List,
    StartTls,
    Info,
    Go,
    StructuredReply,
    ListMetaContext,
    SetMetaContext,
    ExtendedHeaders,
    /// Anything else, including the withdrawn `NBD_OPT_PEEK_EXPORT`; answered with
    /// `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
}

impl OptionCode {
    pub fn from_wire(code: u32) -> Self {
        match code {
            NBD_OPT_EXPORT_NAME => OptionCode::ExportName,
            NBD_OPT_ABORT => OptionCode::Abort,
            NBD_OPT_LIST => OptionCode::List,
            NBD_OPT_STARTTLS => OptionCode::StartTls,
            NBD_OPT_INFO => OptionCode::Info,
            NBD_OPT_GO => OptionCode::Go,
            NBD_OPT_STRUCTURED_REPLY => OptionCode::StructuredReply,
            NBD_OPT_LIST_META_CONTEXT => OptionCode::ListMetaContext,
            NBD_OPT_SET_META_CONTEXT => OptionCode::SetMetaContext,
            NBD_OPT_EXTENDED_HEADERS => OptionCode::ExtendedHeaders,
            other => OptionCode::Unsupported(other),
        }
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the information types
/// the client asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub info_types: Vec<u16>,
}

impl InfoRequest {
    pub fn parse(data: &[u8]) -> Result<Self, ParseError> {
        let mut reader = ByteReader::new(data);
        let name_len = reader.u32()?;
        let name = reader.string(name_len)?;
        let count = reader.u16()?;
        // The count is checked against the bytes present before anything is allocated.
        if usize::from(count) * 2 > reader.remaining() {
            return Err(ParseError::Short);
        }
        let mut info_types = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            info_types.push(reader.u16()?);
        }
        reader.finish()?;
        Ok(InfoRequest { name, info_types })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_u32(&mut out, self.name.len() as u32);
        out.extend_from_slice(self.name.as_bytes());
        put_u16(&mut out, self.info_types.len() as u16);
        for info in &self.info_types {
            put_u16(&mut out, *info);
        }
        out
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn parse(data: &[u8]) -> Result<Self, ParseError> {
        let mut reader = ByteReader::new(data);
        let name_len = reader.u32()?;
        let name = reader.string(name_len)?;
        let count = reader.u32()?;
        // Each query takes at least its 4-byte length, so a lying count fails on short input
        // after at most `data.len() / 4` rounds; nothing is allocated from the count.
        let mut queries = Vec::new();
        for _ in 0..count {
            let len = reader.u32()?;
            queries.push(reader.string(len)?);
        }
        reader.finish()?;
        Ok(MetaContextRequest { name, queries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_u32(&mut out, self.name.len() as u32);
        out.extend_from_slice(self.name.as_bytes());
        put_u32(&mut out, self.queries.len() as u32);
        for query in &self.queries {
            put_u32(&mut out, query.len() as u32);
            out.extend_from_slice(query.as_bytes());
        }
        out
    }
}

/// Appends an option reply: magic, option, reply type, length, data.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    put_u64(out, OPTION_REPLY_MAGIC);
    put_u32(out, option);
    put_u32(out, reply_type);
    put_u32(out, data.len() as u32);
    out.extend_from_slice(data);
}

/// Appends an option reply whose data is built in place by `fill`; the length is patched in
/// afterwards, so no temporary buffer is needed.
pub fn put_option_reply_with(
    out: &mut Vec<u8>,
    option: u32,
    reply_type: u32,
    fill: impl FnOnce(&mut Vec<u8>),
) {
    put_u64(out, OPTION_REPLY_MAGIC);
    put_u32(out, option);
    put_u32(out, reply_type);
    let length_at = out.len();
    put_u32(out, 0);
    let data_start = out.len();
    fill(out);
    let data_len = (out.len() - data_start) as u32;
    out[length_at..length_at + 4].copy_from_slice(&data_len.to_be_bytes());
}

// ---------------------------------------------------------------------------------------------
// Requests.

/// A command type as the client sent it ("Request types").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// Anything else (including `NBD_CMD_RESIZE`, which is not offered); answered with
    /// `NBD_EINVAL`.
    Unsupported(u16),
}

impl Command {
    pub fn from_wire(code: u16) -> Self {
        match code {
            NBD_CMD_READ => Command::Read,
            NBD_CMD_WRITE => Command::Write,
            NBD_CMD_DISC => Command::Disc,
            NBD_CMD_FLUSH => Command::Flush,
            NBD_CMD_TRIM => Command::Trim,
            NBD_CMD_CACHE => Command::Cache,
            NBD_CMD_WRITE_ZEROES => Command::WriteZeroes,
            NBD_CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unsupported(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => NBD_CMD_READ,
            Command::Write => NBD_CMD_WRITE,
            Command::Disc => NBD_CMD_DISC,
            Command::Flush => NBD_CMD_FLUSH,
            Command::Trim => NBD_CMD_TRIM,
            Command::Cache => NBD_CMD_CACHE,
            Command::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Command::BlockStatus => NBD_CMD_BLOCK_STATUS,
            Command::Unsupported(code) => code,
        }
    }
}

/// A request header that did not start with the expected magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

/// A decoded request header, compact or extended. `length` is the 32-bit length widened for
/// compact requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl RequestHeader {
    /// Decodes a compact request ("Request message": `NBD_REQUEST_MAGIC`).
    pub fn decode_compact(bytes: &[u8; REQUEST_HEADER_COMPACT_BYTES]) -> Result<Self, BadMagic> {
        let magic = be_u32(bytes, 0);
        if magic != NBD_REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: be_u16(bytes, 4),
            command: Command::from_wire(be_u16(bytes, 6)),
            cookie: be_u64(bytes, 8),
            offset: be_u64(bytes, 16),
            length: u64::from(be_u32(bytes, 24)),
        })
    }

    /// Decodes an extended request (`NBD_EXTENDED_REQUEST_MAGIC`, 64-bit length).
    pub fn decode_extended(bytes: &[u8; REQUEST_HEADER_EXTENDED_BYTES]) -> Result<Self, BadMagic> {
        let magic = be_u32(bytes, 0);
        if magic != NBD_EXTENDED_REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: be_u16(bytes, 4),
            command: Command::from_wire(be_u16(bytes, 6)),
            cookie: be_u64(bytes, 8),
            offset: be_u64(bytes, 16),
            length: be_u64(bytes, 24),
        })
    }

    /// Encodes a compact request; `length` must fit 32 bits (it is truncated otherwise).
    pub fn encode_compact(&self) -> [u8; REQUEST_HEADER_COMPACT_BYTES] {
        let mut out = [0u8; REQUEST_HEADER_COMPACT_BYTES];
        out[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&(self.length as u32).to_be_bytes());
        out
    }

    pub fn encode_extended(&self) -> [u8; REQUEST_HEADER_EXTENDED_BYTES] {
        let mut out = [0u8; REQUEST_HEADER_EXTENDED_BYTES];
        out[0..4].copy_from_slice(&NBD_EXTENDED_REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..32].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Replies.

/// Which reply headers the connection negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyMode {
    /// Only simple replies (nothing negotiated).
    Simple,
    /// `NBD_OPT_STRUCTURED_REPLY`: 20-byte structured chunks; simple replies allowed for
    /// replies without payload other than READ.
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte extended requests and reply chunks only.
    Extended,
}

impl ReplyMode {
    /// Whether structured or extended chunks (and so sparse reads and block status) are in
    /// use.
    pub fn chunked(self) -> bool {
        self != ReplyMode::Simple
    }
}

/// Appends a simple reply header ("Simple reply message").
pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    put_u32(out, NBD_SIMPLE_REPLY_MAGIC);
    put_u32(out, error);
    put_u64(out, cookie);
}

/// Appends a reply chunk header: structured ("Structured reply chunk message") or extended
/// ("Extended reply chunk message", which repeats the request's offset). `payload_len` must
/// fit 32 bits for structured chunks; callers keep payloads under [`PAYLOAD_MAX_BYTES`] plus
/// fixed overhead.
pub fn put_chunk_header(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    flags: u16,
    reply_type: u16,
    cookie: u64,
    request_offset: u64,
    payload_len: u64,
) {
    debug_assert!(
        mode.chunked(),
        "chunk headers need structured or extended replies"
    );
    if mode == ReplyMode::Extended {
        put_u32(out, NBD_EXTENDED_REPLY_MAGIC);
        put_u16(out, flags);
        put_u16(out, reply_type);
        put_u64(out, cookie);
        put_u64(out, request_offset);
        put_u64(out, payload_len);
    } else {
        debug_assert!(payload_len <= u64::from(u32::MAX));
        put_u32(out, NBD_STRUCTURED_REPLY_MAGIC);
        put_u16(out, flags);
        put_u16(out, reply_type);
        put_u64(out, cookie);
        put_u32(out, payload_len as u32);
    }
}

/// The payload of `NBD_REPLY_TYPE_ERROR`: error, message length, message (cut to the string
/// limit).
pub fn error_payload(error: u32, message: &str) -> Vec<u8> {
    let message = truncate_string(message);
    let mut out = Vec::with_capacity(6 + message.len());
    put_u32(&mut out, error);
    // `truncate_string` keeps the message within 4096 bytes, so it fits 16 bits.
    put_u16(&mut out, message.len() as u16);
    out.extend_from_slice(message.as_bytes());
    out
}

/// One extent as sent in a block status chunk, for any metadata context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusDescriptor {
    pub len_bytes: u64,
    pub flags: u32,
}

/// The payload of `NBD_REPLY_TYPE_BLOCK_STATUS` (32-bit lengths) or, in extended mode,
/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (descriptor count, 64-bit lengths and flags).
/// Descriptor lengths must already fit 32 bits for the compact form.
pub fn block_status_payload(
    mode: ReplyMode,
    context_id: u32,
    descriptors: &[StatusDescriptor],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + descriptors.len() * 16);
    put_u32(&mut out, context_id);
    if mode == ReplyMode::Extended {
        put_u32(&mut out, descriptors.len() as u32);
        for descriptor in descriptors {
            put_u64(&mut out, descriptor.len_bytes);
            put_u64(&mut out, u64::from(descriptor.flags));
        }
    } else {
        for descriptor in descriptors {
            debug_assert!(descriptor.len_bytes <= u64::from(u32::MAX));
            put_u32(&mut out, descriptor.len_bytes as u32);
            put_u32(&mut out, descriptor.flags);
        }
    }
    out
}

/// The reply type of a block status chunk in `mode`.
pub fn block_status_reply_type(mode: ReplyMode) -> u16 {
    if mode == ReplyMode::Extended {
        NBD_REPLY_TYPE_BLOCK_STATUS_EXT
    } else {
        NBD_REPLY_TYPE_BLOCK_STATUS
    }
}

/// Transmission flags for an export ("Transmission flags"). Everything the server implements
/// is advertised; write features only on writable exports; `SEND_DF` only once structured or
/// extended replies are agreed, as the spec requires. `CAN_MULTI_CONN` holds because the
/// engine's flush covers every session of the pool.
pub fn transmission_flags(read_only: bool, mode: ReplyMode) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE;
    if read_only {
        flags |= NBD_FLAG_READ_ONLY;
    } else {
        flags |= NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_SEND_FAST_ZERO;
    }
    if mode.chunked() {
        flags |= NBD_FLAG_SEND_DF;
    }
    flags
}

// ---------------------------------------------------------------------------------------------
// Big-endian primitives.

pub fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_be_bytes());
}

pub fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_be_bytes());
}

pub fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn be_u16<const N: usize>(bytes: &[u8; N], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be_u32<const N: usize>(bytes: &[u8; N], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn be_u64<const N: usize>(bytes: &[u8; N], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

/// A human name for an errno value, for logs.
pub struct ErrnoName(pub u32);

impl fmt::Display for ErrnoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            0 => "OK",
            NBD_EPERM => "EPERM",
            NBD_EIO => "EIO",
            NBD_ENOMEM => "ENOMEM",
            NBD_EINVAL => "EINVAL",
            NBD_ENOSPC => "ENOSPC",
            NBD_EOVERFLOW => "EOVERFLOW",
            NBD_ENOTSUP => "ENOTSUP",
            NBD_ESHUTDOWN => "ESHUTDOWN",
            other => return write!(f, "errno {other}"),
        };
        f.write_str(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newstyle_negotiation_magics() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
    }

    #[test]
    fn option_reply_types_errors_have_bit_31() {
        for code in [
            NBD_REP_ERR_UNSUP,
            NBD_REP_ERR_POLICY,
            NBD_REP_ERR_INVALID,
            NBD_REP_ERR_PLATFORM,
            NBD_REP_ERR_TLS_REQD,
            NBD_REP_ERR_UNKNOWN,
            NBD_REP_ERR_SHUTDOWN,
            NBD_REP_ERR_BLOCK_SIZE_REQD,
            NBD_REP_ERR_TOO_BIG,
            NBD_REP_ERR_EXT_HEADER_REQD,
        ] {
            assert_eq!(code >> 31, 1);
        }
        assert_eq!(NBD_REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(NBD_REP_ERR_EXT_HEADER_REQD, 0x8000_000a);
    }

    #[test]
    fn option_types_decode_unknown_as_unsupported() {
        assert_eq!(OptionCode::from_wire(7), OptionCode::Go);
        assert_eq!(OptionCode::from_wire(11), OptionCode::ExtendedHeaders);
        assert_eq!(
            OptionCode::from_wire(NBD_OPT_PEEK_EXPORT),
            OptionCode::Unsupported(4)
        );
        assert_eq!(
            OptionCode::from_wire(0xdead),
            OptionCode::Unsupported(0xdead)
        );
    }

    #[test]
    fn fixed_newstyle_option_reply_layout() {
        let mut out = Vec::new();
        put_option_reply(&mut out, NBD_OPT_LIST, NBD_REP_ACK, &[]);
        assert_eq!(out.len(), 20);
        assert_eq!(&out[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &NBD_OPT_LIST.to_be_bytes());
        assert_eq!(&out[12..16], &NBD_REP_ACK.to_be_bytes());
        assert_eq!(&out[16..20], &0u32.to_be_bytes());

        let mut patched = Vec::new();
        put_option_reply_with(&mut patched, NBD_OPT_GO, NBD_REP_INFO, |data| {
            put_u16(data, NBD_INFO_EXPORT);
            put_u64(data, 1 << 40);
            put_u16(data, 3);
        });
        let mut direct = Vec::new();
        let mut data = Vec::new();
        put_u16(&mut data, NBD_INFO_EXPORT);
        put_u64(&mut data, 1 << 40);
        put_u16(&mut data, 3);
        put_option_reply(&mut direct, NBD_OPT_GO, NBD_REP_INFO, &data);
        assert_eq!(patched, direct);
        assert_eq!(
            &patched[16..20],
            &12u32.to_be_bytes(),
            "NBD_INFO_EXPORT length MUST be 12"
        );
    }

    #[test]
    fn nbd_opt_info_and_go_data_round_trip() {
        let request = InfoRequest {
            name: "vol@dev".into(),
            info_types: vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME],
        };
        let encoded = request.encode();
        assert_eq!(InfoRequest::parse(&encoded).unwrap(), request);
    }

    #[test]
    fn nbd_opt_info_and_go_data_rejects_bad_lengths() {
        // Name length larger than the option data - 6.
        let mut data = Vec::new();
        put_u32(&mut data, 100);
        data.extend_from_slice(b"vol");
        put_u16(&mut data, 0);
        assert_eq!(InfoRequest::parse(&data), Err(ParseError::Short));
        // Information request count larger than the bytes present.
        let mut data = Vec::new();
        put_u32(&mut data, 3);
        data.extend_from_slice(b"vol");
        put_u16(&mut data, 1000);
        assert_eq!(InfoRequest::parse(&data), Err(ParseError::Short));
        // Trailing bytes.
        let mut data = InfoRequest {
            name: "vol".into(),
            info_types: vec![],
        }
        .encode();
        data.push(0);
        assert_eq!(InfoRequest::parse(&data), Err(ParseError::Trailing(1)));
        // Empty data.
        assert_eq!(InfoRequest::parse(&[]), Err(ParseError::Short));
    }

    #[test]
    fn conventions_strings_are_utf8_without_nul_and_bounded() {
        let mut data = Vec::new();
        put_u32(&mut data, 3);
        data.extend_from_slice(b"a\0b");
        put_u16(&mut data, 0);
        assert_eq!(InfoRequest::parse(&data), Err(ParseError::StringInvalid));
        let mut data = Vec::new();
        put_u32(&mut data, 2);
        data.extend_from_slice(&[0xff, 0xfe]);
        put_u16(&mut data, 0);
        assert_eq!(InfoRequest::parse(&data), Err(ParseError::StringInvalid));
        let long = "x".repeat(STRING_MAX_BYTES + 1);
        let data = InfoRequest {
            name: long,
            info_types: vec![],
        }
        .encode();
        assert_eq!(InfoRequest::parse(&data), Err(ParseError::StringTooLong));
        let multibyte = "é".repeat(STRING_MAX_BYTES);
        let cut = truncate_string(&multibyte);
        assert!(cut.len() <= STRING_MAX_BYTES && cut.is_char_boundary(cut.len()));
    }

    #[test]
    fn nbd_opt_set_meta_context_data_round_trip_and_limits() {
        let request = MetaContextRequest {
            name: "vol".into(),
            queries: vec![BASE_ALLOCATION.into(), "qemu:x".into()],
        };
        assert_eq!(
            MetaContextRequest::parse(&request.encode()).unwrap(),
            request
        );
        // A query count that lies fails on short input instead of allocating.
        let mut data = Vec::new();
        put_u32(&mut data, 0);
        put_u32(&mut data, u32::MAX);
        assert_eq!(MetaContextRequest::parse(&data), Err(ParseError::Short));
        // A query length past the end of the data is invalid.
        let mut data = Vec::new();
        put_u32(&mut data, 0);
        put_u32(&mut data, 1);
        put_u32(&mut data, 50);
        data.extend_from_slice(b"base:");
        assert_eq!(MetaContextRequest::parse(&data), Err(ParseError::Short));
    }

    #[test]
    fn metadata_querying_query_strings() {
        assert_eq!(
            MetaQuery::parse("base:allocation"),
            MetaQuery::BaseAllocation
        );
        assert_eq!(MetaQuery::parse("base:"), MetaQuery::BaseWildcard);
        assert_eq!(MetaQuery::parse("base:other"), MetaQuery::Ignored);
        for (query, namespace) in [
            ("grove:", DiffNamespace::Grove),
            ("grove:diff:", DiffNamespace::Grove),
            ("qemu:", DiffNamespace::Qemu),
            ("qemu:dirty-bitmap:", DiffNamespace::Qemu),
        ] {
            assert_eq!(MetaQuery::parse(query), MetaQuery::DiffWildcard(namespace));
        }
        assert_eq!(
            MetaQuery::parse("grove:diff:vol@v1"),
            MetaQuery::Diff(DiffNamespace::Grove, "vol@v1")
        );
        assert_eq!(
            MetaQuery::parse("qemu:dirty-bitmap:main"),
            MetaQuery::Diff(DiffNamespace::Qemu, "main")
        );
        // Leaves of known namespaces this server does not have, and unknown namespaces.
        for query in [
            "grove:diffx",
            "grove:other:x",
            "qemu:allocation-depth",
            "x-foo:bar",
            "",
            "grove",
        ] {
            assert_eq!(MetaQuery::parse(query), MetaQuery::Ignored, "{query}");
        }
        assert_eq!(
            DiffNamespace::Qemu.context_name("c1"),
            "qemu:dirty-bitmap:c1"
        );
        assert_eq!(DiffNamespace::Grove.changed_flag(), 1);
        assert_eq!(DiffNamespace::Qemu.changed_flag(), NBD_STATE_DIRTY);
    }

    #[test]
    fn request_message_compact_layout() {
        let header = RequestHeader {
            flags: NBD_CMD_FLAG_FUA,
            command: Command::Write,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 33,
            length: 4096,
        };
        let bytes = header.encode_compact();
        assert_eq!(&bytes[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&bytes[4..6], &[0, 1]);
        assert_eq!(&bytes[6..8], &[0, 1]);
        assert_eq!(RequestHeader::decode_compact(&bytes), Ok(header));
        let mut bad = bytes;
        bad[0] = 0x12;
        assert!(RequestHeader::decode_compact(&bad).is_err());
        // An extended request on a compact connection is a bad magic too.
        let extended = header.encode_extended();
        let mut prefix = [0u8; REQUEST_HEADER_COMPACT_BYTES];
        prefix.copy_from_slice(&extended[..REQUEST_HEADER_COMPACT_BYTES]);
        assert_eq!(
            RequestHeader::decode_compact(&prefix),
            Err(BadMagic(NBD_EXTENDED_REQUEST_MAGIC))
        );
    }

    #[test]
    fn request_message_extended_layout_has_64_bit_length() {
        let header = RequestHeader {
            flags: NBD_CMD_FLAG_NO_HOLE,
            command: Command::WriteZeroes,
            cookie: 7,
            offset: 0,
            length: 16 << 40,
        };
        let bytes = header.encode_extended();
        assert_eq!(&bytes[0..4], &[0x21, 0xe4, 0x1c, 0x71]);
        assert_eq!(&bytes[24..32], &(16u64 << 40).to_be_bytes());
        assert_eq!(RequestHeader::decode_extended(&bytes), Ok(header));
    }

    #[test]
    fn request_types_decode_unknown_as_unsupported() {
        assert_eq!(Command::from_wire(7), Command::BlockStatus);
        assert_eq!(Command::from_wire(8), Command::Unsupported(8));
        assert_eq!(Command::from_wire(0xffff).to_wire(), 0xffff);
    }

    #[test]
    fn simple_reply_message_layout() {
        let mut out = Vec::new();
        put_simple_reply(&mut out, NBD_EINVAL, 42);
        assert_eq!(out.len(), SIMPLE_REPLY_BYTES);
        assert_eq!(&out[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&out[4..8], &22u32.to_be_bytes());
        assert_eq!(&out[8..16], &42u64.to_be_bytes());
    }

    #[test]
    fn structured_reply_chunk_message_layout() {
        let mut out = Vec::new();
        put_chunk_header(
            &mut out,
            ReplyMode::Structured,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_OFFSET_HOLE,
            9,
            512,
            12,
        );
        assert_eq!(out.len(), STRUCTURED_REPLY_HEADER_BYTES);
        assert_eq!(&out[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&out[4..6], &1u16.to_be_bytes());
        assert_eq!(&out[6..8], &2u16.to_be_bytes());
        assert_eq!(&out[8..16], &9u64.to_be_bytes());
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
    }

    #[test]
    fn extended_reply_chunk_message_layout_repeats_request_offset() {
        let mut out = Vec::new();
        put_chunk_header(
            &mut out,
            ReplyMode::Extended,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_NONE,
            9,
            1 << 40,
            0,
        );
        assert_eq!(out.len(), EXTENDED_REPLY_HEADER_BYTES);
        assert_eq!(&out[0..4], &[0x6e, 0x8a, 0x27, 0x8c]);
        assert_eq!(&out[16..24], &(1u64 << 40).to_be_bytes());
        assert_eq!(&out[24..32], &0u64.to_be_bytes());
    }

    #[test]
    fn nbd_reply_type_error_payload() {
        let payload = error_payload(NBD_EPERM, "read-only");
        assert_eq!(&payload[0..4], &1u32.to_be_bytes());
        assert_eq!(&payload[4..6], &9u16.to_be_bytes());
        assert_eq!(&payload[6..], b"read-only");
        let long = error_payload(NBD_EIO, &"y".repeat(10_000));
        assert_eq!(long.len(), 6 + STRING_MAX_BYTES);
    }

    #[test]
    fn nbd_reply_type_block_status_layouts() {
        let descriptors = [
            StatusDescriptor {
                len_bytes: 4096,
                flags: 0,
            },
            StatusDescriptor {
                len_bytes: 8192,
                flags: NBD_STATE_HOLE | NBD_STATE_ZERO,
            },
        ];
        let compact = block_status_payload(ReplyMode::Structured, 1, &descriptors);
        assert_eq!(
            compact.len(),
            4 + 2 * 8,
            "length MUST be 4 + a positive multiple of 8"
        );
        assert_eq!(&compact[12..16], &8192u32.to_be_bytes());
        assert_eq!(&compact[16..20], &3u32.to_be_bytes());
        let extended = block_status_payload(ReplyMode::Extended, 1, &descriptors);
        assert_eq!(
            extended.len(),
            8 + 2 * 16,
            "length MUST be 8 + a positive multiple of 16"
        );
        assert_eq!(&extended[4..8], &2u32.to_be_bytes(), "descriptor count");
        assert_eq!(&extended[24..32], &8192u64.to_be_bytes());
        assert_eq!(&extended[32..40], &3u64.to_be_bytes());
        assert_eq!(
            block_status_reply_type(ReplyMode::Extended),
            NBD_REPLY_TYPE_BLOCK_STATUS_EXT
        );
    }

    #[test]
    fn transmission_flags_by_export_kind() {
        let writable = transmission_flags(false, ReplyMode::Simple);
        assert_eq!(writable & NBD_FLAG_HAS_FLAGS, NBD_FLAG_HAS_FLAGS);
        assert_eq!(writable & NBD_FLAG_READ_ONLY, 0);
        assert_ne!(writable & NBD_FLAG_SEND_FAST_ZERO, 0);
        assert_eq!(
            writable & NBD_FLAG_SEND_DF,
            0,
            "SEND_DF MUST be clear without structured replies"
        );
        let read_only = transmission_flags(true, ReplyMode::Structured);
        assert_ne!(read_only & NBD_FLAG_READ_ONLY, 0);
        assert_eq!(
            read_only & (NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO),
            0
        );
        assert_ne!(read_only & NBD_FLAG_SEND_DF, 0);
        assert_eq!(read_only & NBD_FLAG_BLOCK_STATUS_PAYLOAD, 0);
    }

    #[test]
    fn option_data_decoders_are_total_on_random_input() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Make small length fields likely, so parsing gets past the first field.
            if len >= 4 && next() % 2 == 0 {
                data[..4].copy_from_slice(&((next() % 8) as u32).to_be_bytes());
            }
            let _ = InfoRequest::parse(&data);
            let _ = MetaContextRequest::parse(&data);
            if let Ok(request) = InfoRequest::parse(&data) {
                assert_eq!(
                    request.encode(),
                    data,
                    "a parsed request re-encodes to the same bytes"
                );
            }
            if let Ok(request) = MetaContextRequest::parse(&data) {
                assert_eq!(request.encode(), data);
            }
            let mut header = [0u8; REQUEST_HEADER_EXTENDED_BYTES];
            for byte in header.iter_mut() {
                *byte = next() as u8;
            }
            let _ = RequestHeader::decode_extended(&header);
        }
    }
}
