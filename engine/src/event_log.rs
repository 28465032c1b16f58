//! The durable event log. Events are written in the journal record of the sync point that
//! makes their change durable (FORMAT.md, "events"), so the log needs no storage of its own:
//! this is an index from sequence numbers to the journal records holding them, rebuilt at open
//! and extended by every sync point that logs events. Reading a page of the log reads just the
//! records it covers.

use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::events::LoggedEvent;
use crate::io::{self, FileKind};
use crate::pool::Pool;

/// A journal record holding events `first..=last`.
#[derive(Clone, Copy, Debug)]
struct Span {
    first: u64,
    last: u64,
    /// When its last event was logged.
    last_unix_ms: u64,
    /// Where the record's payload starts in the journal file, and its length.
    offset: u64,
    len: u64,
}

/// Which journal records hold which events.
#[derive(Debug)]
pub(crate) struct EventIndex {
    spans: Vec<Span>,
    /// The newest event logged, whether or not retention still serves it.
    last: u64,
    /// Events older than this are no longer served.
    retention: Option<Duration>,
}

/// What a page of the log holds.
#[derive(Clone, Debug, Default)]
pub struct EventQuery {
    /// Events after this sequence number (0: from the start).
    pub since: u64,
    /// Only these types (`commit.created`, ...); empty: all.
    pub types: Vec<String>,
    /// Only events about this volume.
    pub volume: Option<String>,
    /// At most this many events.
    pub limit: usize,
}

#[derive(Clone, Debug, Default)]
pub struct EventPage {
    pub events: Vec<LoggedEvent>,
    /// Resume after this sequence number for the next page: the last event looked at, which
    /// with filters may be past the last one returned.
    pub next_since: u64,
    /// The oldest event the log still serves, or the next one when it serves none (0: none
    /// logged yet); older ones fell out of retention.
    pub first_seq: u64,
    /// The newest event logged so far (0: none yet).
    pub last_seq: u64,
}

/// The part of a journal record the log reads.
#[derive(Deserialize)]
struct RecordEvents {
    #[serde(default)]
    events: Vec<LoggedEvent>,
}

impl EventIndex {
    pub(crate) fn new(retention: Option<Duration>) -> Self {
        EventIndex {
            spans: Vec::new(),
            last: 0,
            retention,
        }
    }

    pub(crate) fn set_retention(&mut self, retention: Option<Duration>) {
        self.retention = retention;
        self.expire(crate::types::now_unix_ms());
    }

    /// Notes a durable journal record whose payload at `offset` holds `events` (in order).
    pub(crate) fn append(&mut self, events: &[LoggedEvent], offset: u64, len: u64) {
        let (Some(first), Some(last)) = (events.first(), events.last()) else {
            return;
        };
        self.last = last.seq;
        self.spans.push(Span {
            first: first.seq,
            last: last.seq,
            last_unix_ms: last.time_unix_ms,
            offset,
            len,
        });
        self.expire(crate::types::now_unix_ms());
    }

    /// Forgets records whose events are all older than the retention.
    fn expire(&mut self, now_unix_ms: u64) {
        let Some(retention) = self.retention else {
            return;
        };
        let horizon = now_unix_ms.saturating_sub(retention.as_millis() as u64);
        let keep_from = self.spans.partition_point(|s| s.last_unix_ms < horizon);
        if keep_from > 0 {
            self.spans.drain(..keep_from);
        }
    }

    fn last_seq(&self) -> u64 {
        self.last
    }
}

impl Pool {
    /// Starts the task that logs session events as they happen, each batch with a sync point
    /// of its own (other changes log their events themselves). Without it they wait for the
    /// next sync point. It ends when the pool is dropped.
    pub fn spawn_event_logger(&self) -> tokio::task::JoinHandle<()> {
        let wanted = self.inner.log_wanted.clone();
        let pool = std::sync::Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                wanted.notified().await;
                let Some(inner) = pool.upgrade() else { break };
                if inner.state.lock().pending_events.is_empty() {
                    continue;
                }
                if let Err(err) = inner.flush().await {
                    tracing::warn!(error = %err, "could not log session events");
                }
            }
        })
    }

    /// The newest event logged so far (0: none yet).
    pub fn last_event_seq(&self) -> u64 {
        self.inner.event_index.lock().last_seq()
    }

    /// A page of the event log: events after `query.since`, oldest first, filtered. Reads the
    /// journal: call it from a blocking thread.
    pub fn events(&self, query: &EventQuery) -> Result<EventPage> {
        let (spans, horizon, last_seq, first_seq) = {
            let mut index = self.inner.event_index.lock();
            index.expire(crate::types::now_unix_ms());
            let from = index.spans.partition_point(|s| s.last <= query.since);
            let horizon = index
                .retention
                .map(|r| (crate::types::now_unix_ms()).saturating_sub(r.as_millis() as u64));
            // With every record out of retention, the next event is the first served.
            let first_seq = index
                .spans
                .first()
                .map_or(index.last + u64::from(index.last > 0), |s| s.first);
            (
                index.spans[from..].to_vec(),
                horizon,
                index.last_seq(),
                first_seq,
            )
        };
        let mut page = EventPage {
            first_seq,
            // Events before the first record left fell out of retention: skip past them.
            next_since: spans
                .first()
                .map_or(query.since, |s| query.since.max(s.first - 1)),
            last_seq,
            ..Default::default()
        };
        let limit = query.limit.max(1);
        'records: for span in &spans {
            let bytes = io::read_blocking(
                &*self.inner.backend,
                FileKind::Journal,
                span.offset,
                span.len as usize,
            )?;
            let record: RecordEvents = serde_json::from_slice(&bytes).map_err(|e| {
                Error::corrupt(
                    format!("journal record ({e})"),
                    format!("journal.grove offset {}", span.offset),
                )
            })?;
            for event in record.events {
                if event.seq <= query.since || horizon.is_some_and(|h| event.time_unix_ms < h) {
                    continue;
                }
                let wanted = (query.types.is_empty()
                    || query.types.iter().any(|t| t == event.event.type_name()))
                    && query
                        .volume
                        .as_deref()
                        .is_none_or(|v| event.event.volume() == Some(v));
                page.next_since = event.seq;
                if wanted {
                    page.events.push(event);
                    if page.events.len() >= limit {
                        break 'records;
                    }
                }
            }
        }
        Ok(page)
    }
}
