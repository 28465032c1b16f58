//! The fixed newstyle handshake: greeting, client flags and option haggling, up to the
//! moment the client enters transmission (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or leaves
//! (`NBD_OPT_ABORT`).
//!
//! Every option's data is read whole (at most [`OPTION_DATA_MAX_BYTES`]) before it is
//! answered, so a malformed option never desynchronizes the stream: it gets an error reply
//! and the next option is read. Only violations of the framing itself (bad magic, unknown
//! client flags, oversized or too many options, `NBD_OPT_EXPORT_NAME` on an export that cannot
//! be opened) close the connection.

use std::collections::HashSet;
use std::sync::Arc;

use grove_engine::SessionClient;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::error::{option_reply_error, Error};
use crate::export::{DiffCandidates, ExportHandle, ExportProvider};
use crate::meta::{
    DiffContext, Selection, BASE_ALLOCATION_CONTEXT_ID, DIFF_CONTEXTS_MAX, LISTED_REFS_MAX,
};
use crate::proto::*;
use crate::ServerOptions;

/// The result of a handshake that entered transmission.
pub(crate) struct Negotiated<H> {
    pub handle: Arc<H>,
    pub export_name: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub transmission_flags: u16,
    pub mode: ReplyMode,
    /// The metadata contexts the client selected for this export, if any.
    pub contexts: Option<Selection>,
}

/// What the client agreed so far.
struct State {
    no_zeroes: bool,
    mode: ReplyMode,
    /// What the last `NBD_OPT_SET_META_CONTEXT` selected, and for which export.
    selection: Option<Selection>,
}

enum Flow<H> {
    Continue,
    Abort,
    Transmission(Negotiated<H>),
}

/// Runs the handshake. `Ok(None)` means the client aborted cleanly.
pub(crate) async fn negotiate<P, R, W>(
    provider: &P,
    reader: &mut R,
    writer: &mut W,
    client: &SessionClient,
    options: &ServerOptions,
) -> Result<Option<Negotiated<P::Handle>>, Error>
where
    P: ExportProvider,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    put_u64(&mut greeting, NBDMAGIC);
    put_u64(&mut greeting, IHAVEOPT);
    put_u16(&mut greeting, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    writer.write_all(&greeting).await?;
    writer.flush().await?;

    let client_flags = reader.read_u32().await?;
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(Error::protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    // A client without NBD_FLAG_C_FIXED_NEWSTYLE is still answered the fixed newstyle way,
    // which the spec allows; such clients only send NBD_OPT_EXPORT_NAME anyway.
    let mut state = State {
        no_zeroes: client_flags & NBD_FLAG_C_NO_ZEROES != 0,
        mode: ReplyMode::Simple,
        selection: None,
    };

    for _ in 0..options.handshake_options_max {
        let magic = reader.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(Error::protocol(format!("bad option magic {magic:#018x}")));
        }
        let option = reader.read_u32().await?;
        let data_len = reader.read_u32().await?;
        if data_len > OPTION_DATA_MAX_BYTES {
            // The data is not read: skipping up to 4 GiB would let a client tie the server up.
            // The reply is best effort before the hard disconnect.
            if option != NBD_OPT_EXPORT_NAME {
                let mut reply = Vec::new();
                let message =
                    format!("option data of {data_len} bytes exceeds {OPTION_DATA_MAX_BYTES}");
                put_option_reply(&mut reply, option, NBD_REP_ERR_TOO_BIG, message.as_bytes());
                let _ = writer.write_all(&reply).await;
                let _ = writer.flush().await;
            }
            return Err(Error::protocol(format!(
                "option {option} data of {data_len} bytes is too long"
            )));
        }
        let mut data = vec![0u8; data_len as usize];
        reader.read_exact(&mut data).await?;
        debug!(option, data_len, "option");

        let mut reply = Vec::new();
        let flow = handle_option(provider, client, &mut state, option, &data, &mut reply)?;
        if !reply.is_empty() {
            let written = async {
                writer.write_all(&reply).await?;
                writer.flush().await
            }
            .await;
            // After NBD_OPT_ABORT the client may close without reading the reply.
            if let Err(error) = written {
                if matches!(flow, Flow::Abort) {
                    return Ok(None);
                }
                return Err(error.into());
            }
        }
        match flow {
            Flow::Continue => {}
            Flow::Abort => return Ok(None),
            Flow::Transmission(negotiated) => return Ok(Some(negotiated)),
        }
    }
    Err(Error::protocol(format!(
        "more than {} options in one handshake",
        options.handshake_options_max
    )))
}

/// Answers one option into `reply`.
fn handle_option<P: ExportProvider>(
    provider: &P,
    client: &SessionClient,
    state: &mut State,
    option: u32,
    data: &[u8],
    reply: &mut Vec<u8>,
) -> Result<Flow<P::Handle>, Error> {
    match OptionCode::from_wire(option) {
        OptionCode::ExportName => {
            export_name(provider, client, state, data, reply).map(Flow::Transmission)
        }
        OptionCode::Abort => {
            // The spec says to ignore any data sent with NBD_OPT_ABORT.
            put_option_reply(reply, option, NBD_REP_ACK, &[]);
            Ok(Flow::Abort)
        }
        OptionCode::List => {
            if !data.is_empty() {
                put_error(
                    reply,
                    option,
                    NBD_REP_ERR_INVALID,
                    "NBD_OPT_LIST takes no data",
                );
                return Ok(Flow::Continue);
            }
            for export in provider.list() {
                if export.name.len() > STRING_MAX_BYTES {
                    continue;
                }
                put_option_reply_with(reply, option, NBD_REP_SERVER, |out| {
                    put_u32(out, export.name.len() as u32);
                    out.extend_from_slice(export.name.as_bytes());
                    out.extend_from_slice(truncate_string(&export.description).as_bytes());
                });
            }
            put_option_reply(reply, option, NBD_REP_ACK, &[]);
            Ok(Flow::Continue)
        }
        OptionCode::StartTls => {
            put_error(
                reply,
                option,
                NBD_REP_ERR_UNSUP,
                "this server does not offer TLS",
            );
            Ok(Flow::Continue)
        }
        OptionCode::Info => info_or_go(provider, client, state, option, data, reply, false),
        OptionCode::Go => info_or_go(provider, client, state, option, data, reply, true),
        OptionCode::StructuredReply => {
            if !data.is_empty() {
                put_error(
                    reply,
                    option,
                    NBD_REP_ERR_INVALID,
                    "NBD_OPT_STRUCTURED_REPLY takes no data",
                );
            } else if state.mode == ReplyMode::Extended {
                put_error(
                    reply,
                    option,
                    NBD_REP_ERR_EXT_HEADER_REQD,
                    "extended headers are already in use",
                );
            } else {
                state.mode = ReplyMode::Structured;
                put_option_reply(reply, option, NBD_REP_ACK, &[]);
            }
            Ok(Flow::Continue)
        }
        OptionCode::ExtendedHeaders => {
            if !data.is_empty() {
                put_error(
                    reply,
                    option,
                    NBD_REP_ERR_INVALID,
                    "NBD_OPT_EXTENDED_HEADERS takes no data",
                );
            } else {
                state.mode = ReplyMode::Extended;
                put_option_reply(reply, option, NBD_REP_ACK, &[]);
            }
            Ok(Flow::Continue)
        }
        OptionCode::ListMetaContext => {
            meta_context(provider, state, option, data, reply, false);
            Ok(Flow::Continue)
        }
        OptionCode::SetMetaContext => {
            meta_context(provider, state, option, data, reply, true);
            Ok(Flow::Continue)
        }
        OptionCode::Unsupported(code) => {
            put_error(
                reply,
                option,
                NBD_REP_ERR_UNSUP,
                &format!("option {code} is not supported"),
            );
            Ok(Flow::Continue)
        }
    }
}

/// `NBD_OPT_EXPORT_NAME`: no error reply exists, so failures close the connection.
fn export_name<P: ExportProvider>(
    provider: &P,
    client: &SessionClient,
    state: &State,
    data: &[u8],
    reply: &mut Vec<u8>,
) -> Result<Negotiated<P::Handle>, Error> {
    if state.mode == ReplyMode::Extended {
        return Err(Error::protocol(
            "NBD_OPT_EXPORT_NAME after extended headers were negotiated",
        ));
    }
    let name =
        parse_string(data).map_err(|error| Error::protocol(format!("bad export name: {error}")))?;
    if name.is_empty() {
        return Err(Error::Open {
            name,
            source: no_default_export(),
        });
    }
    let handle = provider
        .open(&name, client.clone())
        .map_err(|source| Error::Open {
            name: name.clone(),
            source,
        })?;
    let negotiated = negotiated(handle, name, state);
    put_u64(reply, negotiated.size_bytes);
    put_u16(reply, negotiated.transmission_flags);
    if !state.no_zeroes {
        reply.extend_from_slice(&[0u8; EXPORT_NAME_REPLY_PADDING_BYTES]);
    }
    Ok(negotiated)
}

fn negotiated<H: ExportHandle>(
    handle: Arc<H>,
    export_name: String,
    state: &State,
) -> Negotiated<H> {
    let read_only = handle.read_only();
    // The spec: contexts count only if the last SET named the export now entered.
    let contexts = match &state.selection {
        Some(selection) if selection.export == export_name && selection.count() > 0 => {
            let mut selection = selection.clone();
            // The name was resolved when the contexts were selected; should it now open a
            // writable ref, its differences can change after all.
            if !read_only {
                for diff in &mut selection.diffs {
                    diff.base.immutable = false;
                }
            }
            Some(selection)
        }
        _ => None,
    };
    Negotiated {
        size_bytes: handle.size_bytes(),
        read_only,
        transmission_flags: transmission_flags(read_only, state.mode),
        mode: state.mode,
        contexts,
        export_name,
        handle,
    }
}

/// `NBD_OPT_INFO` and `NBD_OPT_GO`.
fn info_or_go<P: ExportProvider>(
    provider: &P,
    client: &SessionClient,
    state: &State,
    option: u32,
    data: &[u8],
    reply: &mut Vec<u8>,
    go: bool,
) -> Result<Flow<P::Handle>, Error> {
    let request = match InfoRequest::parse(data) {
        Ok(request) => request,
        Err(error) => {
            put_error(
                reply,
                option,
                NBD_REP_ERR_INVALID,
                &format!("malformed request: {error}"),
            );
            return Ok(Flow::Continue);
        }
    };
    if request.name.is_empty() {
        let error = no_default_export();
        put_error(
            reply,
            option,
            option_reply_error(&error),
            &error.to_string(),
        );
        return Ok(Flow::Continue);
    }
    // INFO only looks the export up; GO opens it. Both answer from the same resolved ref, so
    // an INFO followed by a GO with the same parameters gets the same information.
    let (canonical_name, description, size_bytes, read_only, handle) = if go {
        match provider.open(&request.name, client.clone()) {
            Ok(handle) => (
                handle.name(),
                handle.description(),
                handle.size_bytes(),
                handle.read_only(),
                Some(handle),
            ),
            Err(error) => {
                debug!(export = %request.name, %error, "cannot open export");
                put_error(
                    reply,
                    option,
                    option_reply_error(&error),
                    &error.to_string(),
                );
                return Ok(Flow::Continue);
            }
        }
    } else {
        match provider.describe(&request.name) {
            Ok(info) => (
                info.name,
                info.description,
                info.size_bytes,
                info.read_only,
                None,
            ),
            Err(error) => {
                put_error(
                    reply,
                    option,
                    option_reply_error(&error),
                    &error.to_string(),
                );
                return Ok(Flow::Continue);
            }
        }
    };

    put_option_reply_with(reply, option, NBD_REP_INFO, |out| {
        put_u16(out, NBD_INFO_EXPORT);
        put_u64(out, size_bytes);
        put_u16(out, transmission_flags(read_only, state.mode));
    });
    // Block sizes are sent whether asked or not (the spec allows unrequested information);
    // they are the spec's defaults, so clients that ignore them lose nothing.
    put_option_reply_with(reply, option, NBD_REP_INFO, |out| {
        put_u16(out, NBD_INFO_BLOCK_SIZE);
        put_u32(out, BLOCK_SIZE_MIN_BYTES);
        put_u32(out, BLOCK_SIZE_PREFERRED_BYTES);
        put_u32(out, PAYLOAD_MAX_BYTES);
    });
    if request.info_types.contains(&NBD_INFO_NAME) {
        put_option_reply_with(reply, option, NBD_REP_INFO, |out| {
            put_u16(out, NBD_INFO_NAME);
            out.extend_from_slice(truncate_string(&canonical_name).as_bytes());
        });
    }
    if request.info_types.contains(&NBD_INFO_DESCRIPTION) {
        put_option_reply_with(reply, option, NBD_REP_INFO, |out| {
            put_u16(out, NBD_INFO_DESCRIPTION);
            out.extend_from_slice(truncate_string(&description).as_bytes());
        });
    }
    put_option_reply(reply, option, NBD_REP_ACK, &[]);
    match handle {
        Some(handle) => Ok(Flow::Transmission(negotiated(handle, request.name, state))),
        None => Ok(Flow::Continue),
    }
}

/// `NBD_OPT_LIST_META_CONTEXT` (`set == false`) and `NBD_OPT_SET_META_CONTEXT`.
fn meta_context<P: ExportProvider>(
    provider: &P,
    state: &mut State,
    option: u32,
    data: &[u8],
    reply: &mut Vec<u8>,
    set: bool,
) {
    if set {
        // The spec: a SET replaces the previous selection even when it fails.
        state.selection = None;
    }
    if !state.mode.chunked() {
        put_error(
            reply,
            option,
            NBD_REP_ERR_INVALID,
            "negotiate structured replies or extended headers first",
        );
        return;
    }
    let request = match MetaContextRequest::parse(data) {
        Ok(request) => request,
        Err(error) => {
            put_error(
                reply,
                option,
                NBD_REP_ERR_INVALID,
                &format!("malformed request: {error}"),
            );
            return;
        }
    };
    if let Err(error) = provider.describe(&request.name) {
        let error = if request.name.is_empty() {
            no_default_export()
        } else {
            error
        };
        put_error(
            reply,
            option,
            option_reply_error(&error),
            &error.to_string(),
        );
        return;
    }
    if set {
        select_contexts(provider, state, option, request, reply);
    } else {
        list_contexts(provider, option, &request, reply);
    }
}

/// `NBD_OPT_LIST_META_CONTEXT`. Queries of unknown namespaces and unknown leaves are ignored,
/// as required. No query lists everything: `base:allocation` and the diff contexts of both
/// namespaces. A wildcard (`base:`, `grove:`, `grove:diff:`, `qemu:`, `qemu:dirty-bitmap:`)
/// lists its namespace's contexts: one per ref of the export's volume, at most
/// [`LISTED_REFS_MAX`], followed by the wildcard itself when more refs are accepted than
/// listed (the spec lets a server answer with a name a client can complete). An exact diff
/// context is listed when it could be selected. Each name is listed once; context ids are
/// zero, as the spec asks of LIST replies.
fn list_contexts<P: ExportProvider>(
    provider: &P,
    option: u32,
    request: &MetaContextRequest,
    reply: &mut Vec<u8>,
) {
    let everything = [
        MetaQuery::BaseWildcard,
        MetaQuery::DiffWildcard(DiffNamespace::Grove),
        MetaQuery::DiffWildcard(DiffNamespace::Qemu),
    ];
    let queries: Vec<MetaQuery<'_>> = if request.queries.is_empty() {
        everything.to_vec()
    } else {
        request
            .queries
            .iter()
            .map(|query| MetaQuery::parse(query))
            .collect()
    };
    let mut candidates: Option<DiffCandidates> = None;
    let mut listed: HashSet<String> = HashSet::new();
    let mut names: Vec<String> = Vec::new();
    let mut offer = |name: String| {
        if listed.insert(name.clone()) {
            names.push(name);
        }
    };
    for query in queries {
        match query {
            MetaQuery::BaseAllocation | MetaQuery::BaseWildcard => {
                offer(BASE_ALLOCATION.to_string());
            }
            MetaQuery::DiffWildcard(namespace) => {
                let candidates = candidates.get_or_insert_with(|| {
                    provider
                        .diff_candidates(&request.name, LISTED_REFS_MAX)
                        .unwrap_or_else(|error| {
                            debug!(export = %request.name, %error, "cannot list diff refs");
                            DiffCandidates::default()
                        })
                });
                for reference in &candidates.references {
                    offer(namespace.context_name(reference));
                }
                if candidates.more {
                    offer(namespace.prefix().to_string());
                }
            }
            MetaQuery::Diff(namespace, reference) => {
                if provider.diff_base(&request.name, reference).is_ok() {
                    offer(namespace.context_name(reference));
                }
            }
            MetaQuery::Ignored => {}
        }
    }
    for name in names {
        if name.len() > STRING_MAX_BYTES {
            continue;
        }
        put_option_reply_with(reply, option, NBD_REP_META_CONTEXT, |out| {
            put_u32(out, 0);
            out.extend_from_slice(name.as_bytes());
        });
    }
    put_option_reply(reply, option, NBD_REP_ACK, &[]);
}

/// `NBD_OPT_SET_META_CONTEXT`. Selects `base:allocation` and every `grove:diff:REF` or
/// `qemu:dirty-bitmap:REF` whose ref the provider accepts for the export; anything else,
/// wildcards included, selects nothing and is not an error (the spec). Each selected context
/// is answered with the name exactly as asked, which is how clients recognize it. More than
/// [`DIFF_CONTEXTS_MAX`] diff contexts is `NBD_REP_ERR_TOO_BIG`.
fn select_contexts<P: ExportProvider>(
    provider: &P,
    state: &mut State,
    option: u32,
    request: MetaContextRequest,
    reply: &mut Vec<u8>,
) {
    let mut selection = Selection {
        export: request.name.clone(),
        allocation: None,
        diffs: Vec::new(),
    };
    let mut next_id = BASE_ALLOCATION_CONTEXT_ID + 1;
    for query in &request.queries {
        match MetaQuery::parse(query) {
            MetaQuery::BaseAllocation => selection.allocation = Some(BASE_ALLOCATION_CONTEXT_ID),
            MetaQuery::Diff(namespace, reference) => {
                if selection.diffs.iter().any(|diff| diff.name == *query) {
                    continue;
                }
                let base = match provider.diff_base(&request.name, reference) {
                    Ok(base) => base,
                    Err(error) => {
                        debug!(export = %request.name, context = %query, %error, "context not selected");
                        continue;
                    }
                };
                if selection.diffs.len() == DIFF_CONTEXTS_MAX {
                    put_error(
                        reply,
                        option,
                        NBD_REP_ERR_TOO_BIG,
                        &format!("at most {DIFF_CONTEXTS_MAX} diff contexts can be selected"),
                    );
                    return;
                }
                selection.diffs.push(DiffContext {
                    id: next_id,
                    namespace,
                    name: query.clone(),
                    base,
                });
                next_id += 1;
            }
            MetaQuery::BaseWildcard | MetaQuery::DiffWildcard(_) | MetaQuery::Ignored => {}
        }
    }
    if let Some(id) = selection.allocation {
        put_option_reply_with(reply, option, NBD_REP_META_CONTEXT, |out| {
            put_u32(out, id);
            out.extend_from_slice(BASE_ALLOCATION.as_bytes());
        });
    }
    for diff in &selection.diffs {
        // Queries come from the client's own option data, so they are valid wire strings.
        put_option_reply_with(reply, option, NBD_REP_META_CONTEXT, |out| {
            put_u32(out, diff.id);
            out.extend_from_slice(diff.name.as_bytes());
        });
    }
    put_option_reply(reply, option, NBD_REP_ACK, &[]);
    state.selection = Some(selection);
}

fn put_error(reply: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    debug_assert!(reply_type & NBD_REP_FLAG_ERROR != 0);
    debug!(
        option,
        reply_type = format_args!("{reply_type:#x}"),
        message,
        "option refused"
    );
    put_option_reply(
        reply,
        option,
        reply_type,
        truncate_string(message).as_bytes(),
    );
}

/// The empty export name (the "default export") means nothing for a pool of versioned
/// volumes: there is no volume a client could expect to get without naming it.
fn no_default_export() -> grove_engine::Error {
    grove_engine::Error::NotFound {
        what: "default export (name a volume: VOL, VOL@BRANCH, VOL@TAG or VOL@COMMIT)".to_string(),
    }
}
